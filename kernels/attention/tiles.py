"""Triton building blocks of paged attention: KV tiles through a block table, online softmax, split merges."""
from __future__ import annotations

import triton
import triton.language as tl

from kernels.store_kv.kernel import hadamard_rows

# Finite "minus infinity" for running maxima: exp2(NEG_BIG - m) is 0, without the NaN of (-inf) - (-inf).
NEG_BIG = tl.constexpr(-1.0e30)
MERGE_CHUNK = tl.constexpr(8)  # split partials a merge reads at a time


@triton.jit
def load_kv(k_cache_ptr, v_cache_ptr, block_row, pos, kv_head, stride_cb, stride_ct, stride_ch, valid,
             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr,
             k_scale_ptr=None, k_zero_ptr=None, v_scale_ptr=None, v_zero_ptr=None, stride_ks_slot=0,
             stride_ks_h=0, stride_vs_slot=0, stride_vs_h=0, KV_BITS: tl.constexpr = 0,
             K_GROUP: tl.constexpr = 0, V_GROUP: tl.constexpr = 0, INT4_DEQUANT: tl.constexpr = 0,
             block=None):
    """K and V [len(pos), BLOCK_D] of one KV head at token positions `pos`, through the block table. MASKED:
    only rows where `valid` (the rest read as zeros, no memory traffic). KV_BITS 8 / 4: the cache holds
    quantized codes (kernels/store_kv/quant.py), dequantized here to float32 tiles with their scales; 0: the
    cache's own dtype, as stored. INT4_DEQUANT picks the int4 dequantization (_dequantize_int4_groups).
    block: the positions' cache blocks (block_ids) where the caller read them ahead; None reads them here."""
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d[None, :] < HEAD_DIM
    if block is None:
        block = _block_of(block_row, pos, valid, BLOCK_SIZE, MASKED)
    if MASKED:
        kv_mask = valid[:, None] & d_mask
    else:
        kv_mask = d_mask
    token_off = block * stride_cb + (pos % BLOCK_SIZE) * stride_ct + kv_head * stride_ch
    if KV_BITS == 0:
        kv_off = token_off[:, None] + offs_d[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)
    else:  # quantized caches have power-of-two head dims: BLOCK_D == HEAD_DIM, no column mask
        slot = block * BLOCK_SIZE + pos % BLOCK_SIZE
        k = _dequantize(k_cache_ptr, k_scale_ptr, k_zero_ptr, token_off, slot * stride_ks_slot
                        + kv_head * stride_ks_h, valid, MASKED, KV_BITS, K_GROUP, BLOCK_D, INT4_DEQUANT)
        v = _dequantize(v_cache_ptr, v_scale_ptr, v_zero_ptr, token_off, slot * stride_vs_slot
                        + kv_head * stride_vs_h, valid, MASKED, KV_BITS, V_GROUP, BLOCK_D, INT4_DEQUANT)
    return k, v


@triton.jit
def load_kv_int8(k_cache_ptr, v_cache_ptr, block_row, pos, kv_head, stride_cb, stride_ct, stride_ch, valid,
                 k_scale_ptr, v_scale_ptr, stride_ks_slot, stride_ks_h, stride_vs_slot, stride_vs_h,
                 BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr, block=None):
    """int8 K and V codes [len(pos), BLOCK_D] as stored and their float32 row scales [len(pos)]: attend_kv
    folds the scales into the scores and probabilities (N values a tile) instead of multiplying every code
    (N · BLOCK_D). MASKED: rows not `valid` read as zeros (codes and scales). block: as in load_kv."""
    offs_d = tl.arange(0, BLOCK_D)
    if block is None:
        block = _block_of(block_row, pos, valid, BLOCK_SIZE, MASKED)
    token_off = block * stride_cb + (pos % BLOCK_SIZE) * stride_ct + kv_head * stride_ch
    kv_off = token_off[:, None] + offs_d[None, :]
    slot = block * BLOCK_SIZE + pos % BLOCK_SIZE
    k = masked_load(k_cache_ptr + kv_off, valid[:, None], MASKED)
    v = masked_load(v_cache_ptr + kv_off, valid[:, None], MASKED)
    k_scale = masked_load(k_scale_ptr + slot * stride_ks_slot + kv_head * stride_ks_h, valid, MASKED)
    v_scale = masked_load(v_scale_ptr + slot * stride_vs_slot + kv_head * stride_vs_h, valid, MASKED)
    return k, v, k_scale.to(tl.float32), v_scale.to(tl.float32)


@triton.jit
def _block_of(block_row, pos, valid, BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(block_row + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    return tl.load(block_row + pos // BLOCK_SIZE).to(tl.int64)


@triton.jit
def block_ids(block_row, n0, end, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """int64 [BLOCK_N]: the cache block of each position in [n0, n0 + BLOCK_N) (0 past `end`). Decode loops
    read each tile's a tile ahead: read in the tile's own iteration, the K/V loads depend on a load there,
    and Triton's pipeliner then keeps them one stage deep whatever num_stages says (sm_90 SASS: every
    cp.async wait drains all, shared memory does not grow with the stages; bench/kernels/sass_mix)."""
    pos = n0 + tl.arange(0, BLOCK_N)
    return tl.load(block_row + pos // BLOCK_SIZE, mask=pos < end, other=0).to(tl.int64)


@triton.jit
def _dequantize(codes_ptr, scale_ptr, zero_ptr, token_off, scale_off, valid, MASKED: tl.constexpr,
                BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_D: tl.constexpr,
                INT4_DEQUANT: tl.constexpr = 0):
    """float32 [N, BLOCK_D] of quantized rows (BLOCK_D = head_dim): int8 codes times their row scale, or int4
    pairs unpacked (low nibble first) times their group scale plus zero. MASKED: rows not `valid` read 0.
    INT4_DEQUANT 0: a scale and a zero gathered per value, codes converted int → float; 1:
    _dequantize_int4_groups."""
    N: tl.constexpr = token_off.shape[0]
    offs_d = tl.arange(0, BLOCK_D)
    # One return, after both constexpr branches: the compiler (unlike the interpreter) still generates code
    # after a return inside a constexpr `if`, and the int4 branch does not compile for int8 (no zeros).
    if BITS == 8:
        codes = masked_load(codes_ptr + token_off[:, None] + offs_d[None, :], valid[:, None], MASKED)
        scale = masked_load(scale_ptr + scale_off, valid, MASKED)
        rows = codes.to(tl.float32) * scale.to(tl.float32)[:, None]
    elif INT4_DEQUANT == 1:
        rows = _dequantize_int4_groups(codes_ptr, scale_ptr, zero_ptr, token_off, scale_off, valid, MASKED,
                                       GROUP, BLOCK_D)
    else:
        pairs = tl.arange(0, BLOCK_D // 2)
        packed = masked_load(codes_ptr + token_off[:, None] + pairs[None, :], valid[:, None], MASKED)
        codes = tl.reshape(tl.join(packed & 0xF, packed >> 4), [N, BLOCK_D]).to(tl.float32)
        group = scale_off[:, None] + offs_d[None, :] // GROUP
        scale = masked_load(scale_ptr + group, valid[:, None], MASKED).to(tl.float32)
        zero = masked_load(zero_ptr + group, valid[:, None], MASKED).to(tl.float32)
        rows = codes * scale + zero
    return rows


@triton.jit
def _dequantize_int4_groups(codes_ptr, scale_ptr, zero_ptr, token_off, scale_off, valid, MASKED: tl.constexpr,
                            GROUP: tl.constexpr, BLOCK_D: tl.constexpr):
    """_dequantize's int4 rows with a load per group, not per value, and no int → float conversion.

    The packed tile is viewed [N, groups, GROUP / 2] so each group's scale and zero load once ([N, groups],
    one short vector a row) and broadcast. A nibble q becomes f = 1 + q/16 by moving it into mantissa bits
    19..22 of 1.0 (w4a16_gemv.nibble_float: a shift and an and-or), and q·s + z = 16s·f + (z − 16s): one
    fp32 multiply-add a value, as exact as the int → float path up to fp32 rounding.
    """
    N: tl.constexpr = token_off.shape[0]
    GROUPS: tl.constexpr = BLOCK_D // GROUP
    pairs = tl.arange(0, BLOCK_D // 2)
    packed = masked_load(codes_ptr + token_off[:, None] + pairs[None, :], valid[:, None], MASKED)
    packed = tl.reshape(packed, [N, GROUPS, GROUP // 2]).to(tl.int32)
    groups = scale_off[:, None] + tl.arange(0, GROUPS)[None, :]
    s16 = 16.0 * masked_load(scale_ptr + groups, valid[:, None], MASKED).to(tl.float32)
    low = masked_load(zero_ptr + groups, valid[:, None], MASKED).to(tl.float32) - s16
    s16 = s16[:, :, None]
    low = low[:, :, None]
    even = ((packed << 19) & 0x00780000 | 0x3F800000).to(tl.float32, bitcast=True) * s16 + low
    odd = ((packed << 15) & 0x00780000 | 0x3F800000).to(tl.float32, bitcast=True) * s16 + low
    return tl.reshape(tl.join(even, odd), [N, BLOCK_D])


@triton.jit
def masked_load(ptrs, valid, MASKED: tl.constexpr):
    """Load `ptrs`, only where `valid` when MASKED (zeros elsewhere): every quantized-cache tile read."""
    if MASKED:
        return tl.load(ptrs, mask=valid, other=0)
    return tl.load(ptrs)


@triton.jit
def attend_kv(acc, m_i, l_i, q, q_pos, k, v, pos, valid, scale_log2,
               BOUNDED: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
               tree_bits=0, chunk_start=0, TREE: tl.constexpr = False, k_scale=None, v_scale=None,
               ROW_SCALES: tl.constexpr = False):
    """Online-softmax step of the q rows over keys k / values v at positions `pos` (masked where not valid
    when BOUNDED; after a row's q_pos when CAUSAL; when also TREE, chunk keys (from chunk_start) whose bit
    is clear in the row's tree_bits [rows] int64 — bit j: the chunk's j-th position). ROW_SCALES: k and v are
    int8 codes with per-key scales k_scale / v_scale [len(pos)] (load_kv_int8): q·(s c) = s (q·c), and
    Σ p (s c) = Σ (p s) c, so the scales multiply the scores and the probabilities, not the codes."""
    k = k.to(q.dtype)  # int8 codes: exact in bf16 / fp16 (|c| <= 127)
    v = v.to(q.dtype)
    if ROW_SCALES:
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * (k_scale * scale_log2)[None, :]
    else:
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    if BOUNDED:
        visible = valid[None, :]
        if CAUSAL:
            visible = visible & (pos[None, :] <= q_pos[:, None])
            if TREE:
                rel = pos - chunk_start  # the key's row in the chunk; negative: the context, always seen
                shift = tl.minimum(tl.maximum(rel, 0), 63).to(tl.int64)
                bit = (tree_bits[:, None] >> shift[None, :]) & 1
                visible = visible & ((rel[None, :] < 0) | (bit != 0))
        qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if ROW_SCALES:
        p_scaled = (p * v_scale[None, :]).to(v.dtype)
        acc = acc * alpha[:, None] + tl.dot(p_scaled, v, input_precision=DOT_PRECISION)
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def attend_tile(
    acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr, block_row, n0, kv_end, kv_head,
    stride_cb, stride_ct, stride_ch, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BOUNDED: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    k_scale_ptr=None, k_zero_ptr=None, v_scale_ptr=None, v_zero_ptr=None, stride_ks_slot=0, stride_ks_h=0,
    stride_vs_slot=0, stride_vs_h=0, KV_BITS: tl.constexpr = 0, K_GROUP: tl.constexpr = 0,
    V_GROUP: tl.constexpr = 0, tree_bits=0, chunk_start=0, TREE: tl.constexpr = False,
    INT4_DEQUANT: tl.constexpr = 0, block=None,
):
    """Online-softmax step over keys [n0, n0 + BLOCK_N) of one sequence and KV head, from paged blocks.

    BOUNDED: the tile may run past kv_end (masked). CAUSAL: keys after a row's q_pos are masked (TREE: and
    chunk keys outside a row's tree_bits, `attend_kv`). Tiles that need neither skip the mask math
    entirely, which is most of a long context. block: the keys' cache blocks read ahead (block_ids), or None.
    """
    pos = n0 + tl.arange(0, BLOCK_N)
    valid = pos < kv_end
    # One return after both constexpr branches (see _dequantize).
    if KV_BITS == 8:  # int8 codes straight into the dots, their row scales folded (attend_kv's ROW_SCALES)
        k, v, k_scale, v_scale = load_kv_int8(
            k_cache_ptr, v_cache_ptr, block_row, pos, kv_head, stride_cb, stride_ct, stride_ch, valid,
            k_scale_ptr, v_scale_ptr, stride_ks_slot, stride_ks_h, stride_vs_slot, stride_vs_h, BLOCK_D,
            BLOCK_SIZE, BOUNDED, block)
        acc, m_i, l_i = attend_kv(acc, m_i, l_i, q, q_pos, k, v, pos, valid, scale_log2, BOUNDED, CAUSAL,
                                  DOT_PRECISION, tree_bits, chunk_start, TREE, k_scale, v_scale, True)
    else:
        k, v = load_kv(k_cache_ptr, v_cache_ptr, block_row, pos, kv_head, stride_cb, stride_ct, stride_ch,
                       valid, HEAD_DIM, BLOCK_D, BLOCK_SIZE, BOUNDED, k_scale_ptr, k_zero_ptr, v_scale_ptr,
                       v_zero_ptr, stride_ks_slot, stride_ks_h, stride_vs_slot, stride_vs_h, KV_BITS, K_GROUP,
                       V_GROUP, INT4_DEQUANT, block)
        acc, m_i, l_i = attend_kv(acc, m_i, l_i, q, q_pos, k, v, pos, valid, scale_log2, BOUNDED, CAUSAL,
                                  DOT_PRECISION, tree_bits, chunk_start, TREE)
    return acc, m_i, l_i


@triton.jit
def merge_splits(part_acc_ptr, part_ml_ptr, out_ptr, row, seq_len, per_split, first_part, heads, head_mask,
                  stride_ot, stride_oh, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Log-sum-exp merge of some query heads' split partials for one row (first_part: [heads], their first).

    Only the splits the decode kernel wrote (its bounds, from the same seq_len): none for an empty sequence,
    whose heads get zeros. Empty splits carry m = NEG_BIG, so weight 0 next to a real one. The splits are
    read MERGE_CHUNK at a time with a running max (a [heads, splits, head_dim] tile of 32 splits would take
    128 registers a thread in the decode kernel that merges in place).
    """
    CHUNK: tl.constexpr = MERGE_CHUNK if BLOCK_S > MERGE_CHUNK else BLOCK_S
    live = tl.cdiv(seq_len, tl.maximum(per_split, 1))
    offs_s = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m_run = tl.full(first_part.shape, NEG_BIG, tl.float32)
    total = tl.zeros(first_part.shape, tl.float32)
    out = tl.zeros((first_part.shape[0], BLOCK_D), tl.float32)
    for s0 in range(0, live, CHUNK):
        part = first_part[:, None] + s0 + offs_s[None, :]  # [heads, CHUNK]
        s_mask = head_mask[:, None] & (s0 + offs_s[None, :] < live)
        m = tl.load(part_ml_ptr + part * 2, mask=s_mask, other=NEG_BIG, cache_modifier=".cg")
        sums = tl.load(part_ml_ptr + part * 2 + 1, mask=s_mask, other=0.0, cache_modifier=".cg")
        acc = tl.load(part_acc_ptr + part[:, :, None] * HEAD_DIM + offs_d[None, None, :],
                      mask=s_mask[:, :, None] & d_mask[None, None, :], other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m_run, tl.max(m, axis=1))
        rescale = tl.exp2(m_run - m_new)
        weight = tl.exp2(m - m_new[:, None])
        total = total * rescale + tl.sum(weight * sums, axis=1)
        out = out * rescale[:, None] + tl.sum(weight[:, :, None] * acc, axis=1)
        m_run = m_new
    out = out / tl.where(total > 0, total, 1.0)[:, None]
    dst = out_ptr + row.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=head_mask[:, None] & d_mask[None, :])


@triton.jit
def decode_program(query_start_ptr, seq_lens_ptr, block_tables_ptr, stride_bt, GROUP: tl.constexpr,
                   NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, MIXED: tl.constexpr):
    """A decode program's (seq, kv_head, split) from its ids, and (row, seq_len, live_heads, per_split, start,
    end, block_row): its query row, its sequence's length, how many query heads it writes, the KV positions
    [start, end) of its split, its block-table row. MIXED: the batch also holds multi-row chunks (the prefill
    kernel's): those get an empty range and write no head (a bound, not a scalar mask: the interpreter's
    stores reject scalar-and-block masks). The step's inputs are host-copied before the graph: safe to read
    before the PDL wait."""
    seq = tl.program_id(0)
    split = tl.program_id(2)
    row = tl.load(query_start_ptr + seq)
    seq_len = tl.load(seq_lens_ptr + seq)
    live_heads = GROUP
    if MIXED:
        is_mine = tl.load(query_start_ptr + seq + 1) - row == 1
        seq_len = tl.where(is_mine, seq_len, 0)
        live_heads = tl.where(is_mine, GROUP, 0)
    # Split bounds come from the device-side seq_len, so a captured grid stays right as sequences grow.
    per_split = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)
    block_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    return seq, tl.program_id(1), split, row, seq_len, live_heads, per_split, start, end, block_row


@triton.jit
def decode_query(q_ptr, row, kv_head, start, seq_len, stride_qt, stride_qh, GROUP: tl.constexpr,
                 BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, HADAMARD: tl.constexpr):
    """The quantized decode kernels' query (int4_decode.py, int8_decode.py): (offs_g, busy, q) — q [BLOCK_G,
    HEAD_DIM] float32, the KV head's GROUP query heads of `row` (rotated when HADAMARD: q·k = (q H)·(k H),
    scored against the keys as stored), zeros in rows not `busy` (padding rows, or a split past the end)."""
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    busy = offs_g < tl.where(start < seq_len, GROUP, 0)
    q = tl.load(q_ptr + row.to(tl.int64) * stride_qt + (kv_head * GROUP + offs_g)[:, None] * stride_qh
                + offs_d[None, :], mask=busy[:, None], other=0.0).to(tl.float32)
    if HADAMARD:
        q = hadamard_rows(q)
    return offs_g, busy, q


@triton.jit
def store_decode(acc, m_i, l_i, out_ptr, part_acc_ptr, part_ml_ptr, arrivals_ptr, seq, kv_head, split, row,
                 seq_len, per_split, offs_g, busy, live_heads, stride_ot, stride_oh, GROUP: tl.constexpr,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
                 MERGE_IN_PLACE: tl.constexpr, BLOCK_S: tl.constexpr):
    """A decode program's result for its query heads kv_head * GROUP + offs_g (acc [heads, BLOCK_D], running
    max m_i and sum l_i): normalized into out when the launch has one split; else its split's partials,
    merged in place by the last split to arrive when MERGE_IN_PLACE (otherwise by the reduce kernel).
    busy: heads whose partials this split writes; live_heads: how many heads the output takes."""
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g
    if NUM_SPLITS == 1:
        # Empty sequences (padding rows of a captured batch) have l == 0: write zeros, not NaN.
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        dst = out_ptr + row.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=(offs_g < live_heads)[:, None] & d_mask[None, :])
    else:
        # Partials [B, Hq, NUM_SPLITS, D] (unnormalized acc) and [B, Hq, NUM_SPLITS, 2] (running max, sum).
        part = (seq.to(tl.int64) * (tl.num_programs(1) * GROUP) + heads) * NUM_SPLITS + split
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc,
                 mask=busy[:, None] & d_mask[None, :])
        tl.store(part_ml_ptr + part * 2, m_i, mask=busy)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=busy)
        if MERGE_IN_PLACE:
            # Every split of this (sequence, KV head) checks in; the last to arrive merges the GROUP heads and
            # resets its counter for the next launch. The barrier + acq_rel atomic publish this program's
            # partials before its arrival is counted, and make the others' visible to the merging program.
            tl.debug_barrier()
            arrival = arrivals_ptr + seq * tl.num_programs(1) + kv_head
            if tl.atomic_add(arrival, 1, sem="acq_rel") == NUM_SPLITS - 1:
                tl.atomic_xchg(arrival, 0, sem="relaxed")
                merge_splits(part_acc_ptr, part_ml_ptr, out_ptr, row, seq_len, per_split,
                             (seq.to(tl.int64) * (tl.num_programs(1) * GROUP) + heads) * NUM_SPLITS,
                             heads, offs_g < live_heads, stride_ot, stride_oh, HEAD_DIM, BLOCK_D, BLOCK_S)
