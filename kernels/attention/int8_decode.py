"""int8 KV decode attention on tensor cores, reading the codes as stored: no converted K or V tile.

The split-K decode kernel (kernel._decode_kernel) loads an int8 tile as bytes and converts every code to the
query's dtype in the dots' layout; compiled for sm_90 its loop issues more instructions a tile than the bf16
cache's while moving half the bytes, so it runs issue-bound at 0.9-1.5x the bf16 cache's speed
(docs/benchmarks.md). Here, as the int4 quad kernel does with nibbles (int4_decode.py), the codes load as
int16 pairs, two neighbouring values of a row, which Triton's shared-memory pipeline and the dot layouts take
as they take a 16-bit tile; a pair becomes two float16 values by two byte permutes (c + 128 in the low
mantissa bits of 1024.0, read as 1152 + c) and one subtraction a pair of pairs, exact. The dots then run over
the even and the odd columns apart:
  - keys: q·k = q_even·k_even + q_odd·k_odd in float16 dots with fp32 sums; the query is brought into
    float16's range by a power of two first (exact), and that power and the keys' per-token scales multiply
    the scores;
  - values: Σ p·s·c over the keys, p·s rounded to float16 after a power of two brings the tile's largest
    value scale to [1, 2) (small scales keep float16's precision, none overflows); the running sums carry
    that power from tile to tile as the online softmax carries its running max.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.attention.tiles import (
    NEG_BIG,
    block_ids,
    decode_program,
    decode_query,
    masked_load,
    store_decode,
)
from kernels.pdl import pdl_release, pdl_wait
from kernels.store_kv.kernel import hadamard_rows

# $2: two int16 pairs (bytes b0 b1 | b2 b3); $0: {b0, b2}, $1: {b1, b3} as float16 c: each byte's sign bit
# flipped (c + 128) under 0x64 (1024.0's high byte) is 1152 + c, minus 1152 (0x6480) exactly.
_PAIRS_PTX = tl.constexpr(
    "{ .reg .b32 x, lo, hi, m; xor.b32 x, $2, 0x80808080; prmt.b32 lo, x, 0x64646464, 0x4240;"
    " prmt.b32 hi, x, 0x64646464, 0x4341; mov.b32 m, 0x64806480; sub.f16x2 $0, lo, m;"
    " sub.f16x2 $1, hi, m; }")


def pairs_fit(q: torch.Tensor, codes: torch.Tensor) -> bool:
    """Whether this kernel serves these operands: bf16 / fp16 queries, int8 codes viewable as int16 pairs,
    and (compiled) half a head at least an MMA step (16)."""
    return (q.dtype in (torch.bfloat16, torch.float16) and codes.dtype == torch.int8
            and (q.shape[-1] >= 32 or q.device.type == "cpu")
            and all(s % 2 == 0 for s in codes.stride()[:3]) and codes.storage_offset() % 2 == 0)


@triton.jit
def pairs(h, PTX: tl.constexpr):
    """int16 [..] → two float16 tensors [..]: each pair's low and high byte as signed codes, exact."""
    if PTX:
        lo, hi = tl.inline_asm_elementwise(_PAIRS_PTX, "=r,=r,r", [h], dtype=(tl.float16, tl.float16),
                                           is_pure=True, pack=2)
    else:  # the interpreter runs no PTX: the same values by shifts
        w = h.to(tl.int32)
        lo = ((w << 24) >> 24).to(tl.float16)
        hi = (w >> 8).to(tl.float16)
    return lo, hi


@triton.jit
def _pow2(biased):
    """float32 2^(biased - 127) of an int32 biased exponent in [1, 254], exactly."""
    return (biased << 23).to(tl.float32, bitcast=True)


@triton.jit
def _exponent(x):
    """int32 biased exponent of float32 x > 0 (x in [2^(e-127), 2^(e-126))), at least 1."""
    return tl.maximum((x.to(tl.int32, bitcast=True) >> 23) & 0xFF, 1)


@triton.jit
def _attend(acc_even, acc_odd, e_acc, m_i, l_i, q_even, q_odd, k_ptr, v_ptr, ks_ptr, vs_ptr, block, n0, end,
            kv_head, stride_cb, stride_ct, stride_ch, stride_ks_slot, stride_ks_h, stride_vs_slot,
            stride_vs_h, score_scale, H2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
            BOUNDED: tl.constexpr, PTX: tl.constexpr):
    """Online-softmax step over keys [n0, n0 + BLOCK_N) in cache blocks `block` [BLOCK_N] (tiles.block_ids,
    read a tile ahead; masked past `end` when BOUNDED). acc_even / acc_odd [BLOCK_G, H2]: the value sums of
    the even / odd columns in units of 2^(e_acc - 127); score_scale: the query's power of two times the
    softmax scale (log2 units)."""
    pos = n0 + tl.arange(0, BLOCK_N)
    valid = pos < end
    slot = block * BLOCK_SIZE + pos % BLOCK_SIZE
    offs = (block * stride_cb + (pos % BLOCK_SIZE) * stride_ct + kv_head * stride_ch)[:, None] \
        + tl.arange(0, H2)[None, :]
    k_even, k_odd = pairs(masked_load(k_ptr + offs, valid[:, None], BOUNDED), PTX)
    dots = tl.dot(q_even, tl.trans(k_even))
    dots = tl.dot(q_odd, tl.trans(k_odd), dots)  # [BLOCK_G, N]: Σ q·c
    k_scale = masked_load(ks_ptr + slot * stride_ks_slot + kv_head * stride_ks_h, valid, BOUNDED)
    k_scale = k_scale.to(tl.float32)
    scores = dots * (k_scale * score_scale)[None, :]
    if BOUNDED:
        scores = tl.where(valid[None, :], scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)

    v_scale = masked_load(vs_ptr + slot * stride_vs_slot + kv_head * stride_vs_h, valid, BOUNDED)
    v_scale = v_scale.to(tl.float32)
    e_new = _exponent(tl.max(v_scale, axis=0))  # the tile's largest scale times 2^(127 - e_new): [1, 2)
    p_scaled = (p * (v_scale * _pow2(254 - e_new))[None, :]).to(tl.float16)
    rebase = (alpha * _pow2(127 + e_acc - e_new))[:, None]  # the sums so far into this tile's units
    v_even, v_odd = pairs(masked_load(v_ptr + offs, valid[:, None], BOUNDED), PTX)
    acc_even = tl.dot(p_scaled, v_even, acc_even * rebase)
    acc_odd = tl.dot(p_scaled, v_odd, acc_odd * rebase)
    return acc_even, acc_odd, e_new, m_new, l_i


@triton.jit
def _int8_decode_kernel(
    q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, block_tables_ptr, seq_lens_ptr, query_start_ptr,
    out_ptr, part_acc_ptr, part_ml_ptr, arrivals_ptr, scale_log2,
    stride_qt, stride_qh, stride_cb, stride_ct, stride_ch, stride_ks_slot, stride_ks_h, stride_vs_slot,
    stride_vs_h, stride_bt, stride_ot, stride_oh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, MIXED: tl.constexpr, MERGE_IN_PLACE: tl.constexpr,
    BLOCK_S: tl.constexpr, USE_PDL: tl.constexpr, HADAMARD: tl.constexpr, PTX: tl.constexpr,
):
    """One program: one sequence, one KV head, one KV split (kernel._decode_kernel's grid and outputs).
    k_ptr / v_ptr: the codes as int16 pairs [blocks, block_size, Hk, HEAD_DIM / 2] (strides in pairs);
    ks / vs: the per-token scales [blocks * block_size, Hk] (slot and head strides)."""
    H2: tl.constexpr = HEAD_DIM // 2
    seq, kv_head, split, row, seq_len, live_heads, per_split, start, end, block_row = decode_program(
        query_start_ptr, seq_lens_ptr, block_tables_ptr, stride_bt, GROUP, NUM_SPLITS, BLOCK_N, MIXED)
    pdl_wait(USE_PDL)
    pdl_release(USE_PDL)

    offs_g, busy, q = decode_query(q_ptr, row, kv_head, start, seq_len, stride_qt, stride_qh, GROUP, BLOCK_G,
                                   HEAD_DIM, HADAMARD)
    # largest |q| into [1, 2): float16 holds every bf16 value there and none overflows
    e_q = _exponent(tl.maximum(tl.max(tl.max(tl.abs(q), axis=1), axis=0), 1e-30))
    q = (q * _pow2(254 - e_q)).to(tl.float16)
    q_even, q_odd = tl.split(tl.reshape(q, [BLOCK_G, H2, 2]))
    score_scale = scale_log2 * _pow2(e_q)

    m_i = tl.full([BLOCK_G], NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    e_acc = tl.full([], 127, tl.int32)
    acc_even = tl.zeros([BLOCK_G, H2], tl.float32)
    acc_odd = tl.zeros([BLOCK_G, H2], tl.float32)
    full_end = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N
    block = block_ids(block_row, start, end, BLOCK_N, BLOCK_SIZE)
    for n0 in range(start, full_end, BLOCK_N):
        this_block = block
        block = block_ids(block_row, n0 + BLOCK_N, end, BLOCK_N, BLOCK_SIZE)
        acc_even, acc_odd, e_acc, m_i, l_i = _attend(
            acc_even, acc_odd, e_acc, m_i, l_i, q_even, q_odd, k_ptr, v_ptr, ks_ptr, vs_ptr, this_block, n0,
            end, kv_head, stride_cb, stride_ct, stride_ch, stride_ks_slot, stride_ks_h, stride_vs_slot,
            stride_vs_h, score_scale, H2, BLOCK_N, BLOCK_SIZE, False, PTX)
    for n0 in range(full_end, end, BLOCK_N):
        acc_even, acc_odd, e_acc, m_i, l_i = _attend(
            acc_even, acc_odd, e_acc, m_i, l_i, q_even, q_odd, k_ptr, v_ptr, ks_ptr, vs_ptr, block, n0, end,
            kv_head, stride_cb, stride_ct, stride_ch, stride_ks_slot, stride_ks_h, stride_vs_slot,
            stride_vs_h, score_scale, H2, BLOCK_N, BLOCK_SIZE, True, PTX)

    acc = tl.reshape(tl.join(acc_even, acc_odd), [BLOCK_G, HEAD_DIM]) * _pow2(e_acc)
    if HADAMARD:  # values were stored as v H: the weighted sum comes back by H
        acc = hadamard_rows(acc)
    store_decode(acc, m_i, l_i, out_ptr, part_acc_ptr, part_ml_ptr, arrivals_ptr, seq, kv_head, split, row,
                 seq_len, per_split, offs_g, busy, live_heads, stride_ot, stride_oh, GROUP, HEAD_DIM,
                 HEAD_DIM, NUM_SPLITS, MERGE_IN_PLACE, BLOCK_S)


def launch_int8_pairs(grid: tuple[int, int, int], q: torch.Tensor, k_codes: torch.Tensor,
                      v_codes: torch.Tensor, quant: dict, meta, scale_log2: float, out: torch.Tensor,
                      part_acc: torch.Tensor, part_ml: torch.Tensor, arrivals: torch.Tensor, *, block_n: int,
                      num_warps: int, num_stages: int, mixed: bool, merge_in_place: bool, pdl: dict,
                      ptx: bool | None = None) -> None:
    """The kernel over kernel._launch_decode's grid and buffers (pairs_fit must hold). ptx: the inline-PTX
    byte permutes (default: on CUDA; the interpreter runs none)."""
    group = q.shape[1] // k_codes.shape[2]
    _int8_decode_kernel[grid](
        q, k_codes.view(torch.int16), v_codes.view(torch.int16), quant["k_scale_ptr"], quant["v_scale_ptr"],
        meta.block_tables, meta.seq_lens, meta.query_start_loc, out, part_acc, part_ml, arrivals, scale_log2,
        q.stride(0), q.stride(1), k_codes.stride(0) // 2, k_codes.stride(1) // 2, k_codes.stride(2) // 2,
        quant["stride_ks_slot"], quant["stride_ks_h"], quant["stride_vs_slot"], quant["stride_vs_h"],
        meta.block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=q.shape[2],
        BLOCK_SIZE=meta.block_size, BLOCK_N=block_n, NUM_SPLITS=grid[2], MIXED=mixed,
        MERGE_IN_PLACE=merge_in_place, BLOCK_S=triton.next_power_of_2(grid[2]), HADAMARD=quant["HADAMARD"],
        PTX=q.is_cuda if ptx is None else ptx, num_warps=num_warps, num_stages=num_stages, **pdl)
