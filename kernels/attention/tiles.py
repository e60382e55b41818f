"""Triton building blocks of paged attention: KV tiles through a block table, online softmax, split merges."""
from __future__ import annotations

import triton
import triton.language as tl

# Finite "minus infinity" for running maxima: exp2(NEG_BIG - m) is 0, without the NaN of (-inf) - (-inf).
NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def load_kv(k_cache_ptr, v_cache_ptr, block_row, pos, kv_head, stride_cb, stride_ct, stride_ch, valid,
             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr):
    """K and V [len(pos), BLOCK_D] of one KV head at token positions `pos`, through the block table. MASKED:
    only rows where `valid` (the rest read as zeros, no memory traffic)."""
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d[None, :] < HEAD_DIM
    if MASKED:
        block = tl.load(block_row + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        kv_mask = valid[:, None] & d_mask
    else:
        block = tl.load(block_row + pos // BLOCK_SIZE).to(tl.int64)
        kv_mask = d_mask
    token_off = block * stride_cb + (pos % BLOCK_SIZE) * stride_ct + kv_head * stride_ch
    kv_off = token_off[:, None] + offs_d[None, :]
    k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)
    return k, v


@triton.jit
def attend_kv(acc, m_i, l_i, q, q_pos, k, v, pos, valid, scale_log2,
               BOUNDED: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online-softmax step of the q rows over keys k / values v at positions `pos` (masked where not valid
    when BOUNDED; after a row's q_pos when CAUSAL)."""
    k = k.to(q.dtype)
    v = v.to(q.dtype)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    if BOUNDED:
        visible = valid[None, :]
        if CAUSAL:
            visible = visible & (pos[None, :] <= q_pos[:, None])
        qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def attend_tile(
    acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr, block_row, n0, kv_end, kv_head,
    stride_cb, stride_ct, stride_ch, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BOUNDED: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online-softmax step over keys [n0, n0 + BLOCK_N) of one sequence and KV head, from paged blocks.

    BOUNDED: the tile may run past kv_end (masked). CAUSAL: keys after a row's q_pos are masked. Tiles that
    need neither skip the mask math entirely, which is most of a long context.
    """
    pos = n0 + tl.arange(0, BLOCK_N)
    valid = pos < kv_end
    k, v = load_kv(k_cache_ptr, v_cache_ptr, block_row, pos, kv_head, stride_cb, stride_ct, stride_ch, valid,
                    HEAD_DIM, BLOCK_D, BLOCK_SIZE, BOUNDED)
    return attend_kv(acc, m_i, l_i, q, q_pos, k, v, pos, valid, scale_log2, BOUNDED, CAUSAL, DOT_PRECISION)


@triton.jit
def merge_splits(part_acc_ptr, part_ml_ptr, out_ptr, row, seq_len, per_split, first_part, heads, head_mask,
                  stride_ot, stride_oh, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Log-sum-exp merge of some query heads' split partials for one row (first_part: [heads], their first).

    Only the splits the decode kernel wrote (its bounds, from the same seq_len): none for an empty sequence,
    whose heads get zeros. Empty splits carry m = NEG_BIG, so weight 0 next to a real one.
    """
    live = tl.cdiv(seq_len, tl.maximum(per_split, 1))
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    part = first_part[:, None] + offs_s[None, :]  # [heads, splits]
    s_mask = head_mask[:, None] & (offs_s[None, :] < live)
    m = tl.load(part_ml_ptr + part * 2, mask=s_mask, other=NEG_BIG, cache_modifier=".cg")
    sums = tl.load(part_ml_ptr + part * 2 + 1, mask=s_mask, other=0.0, cache_modifier=".cg")
    acc_mask = s_mask[:, :, None] & (offs_d[None, None, :] < HEAD_DIM)
    acc = tl.load(part_acc_ptr + part[:, :, None] * HEAD_DIM + offs_d[None, None, :], mask=acc_mask,
                  other=0.0, cache_modifier=".cg")
    weight = tl.exp2(m - tl.max(m, axis=1)[:, None])
    total = tl.sum(weight * sums, axis=1)
    out = tl.sum(weight[:, :, None] * acc, axis=1) / tl.where(total > 0, total, 1.0)[:, None]
    dst = out_ptr + row.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=head_mask[:, None] & (offs_d[None, :] < HEAD_DIM))
