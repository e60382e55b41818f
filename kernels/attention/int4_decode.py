"""int4 KV decode attention on tensor cores, reading the codes as stored: no dequantized K or V tile.

The dequantizing decode (tiles._dequantize) spends a multiply-add a value and a conversion into the dot's
layout, and Triton leaves its byte loads out of its shared-memory pipeline: it ran at the bf16 cache's
speed with a quarter of the bytes (docs/benchmarks.md, "int4 KV decode: tiles, splits, a hand prefetch").
Here, as in the tensor-core W4A16 kernel (kernels/nibbles.py), the codes load as int16 quads that feed the
dots directly, so they are pipelined like a bf16 tile, and a code q becomes the float q − 8 by one LOP3 and
one fma a pair (nibbles.quads with CENTER). Each int4 group has its own scale s and zero z (value = s·q + z =
s·(q − 8) + m, m = z + 8s its midpoint), so the affine moves out of the products:
  - keys: the query's rows are repeated once per key group, each copy zero outside its group, so one dot
    gives every (group, head) its own sum Σ q·(c − 8); the score is Σ_groups s·that + m·Σ q;
  - values: the probabilities are repeated once per value group, each copy times that group's scale and
    rounded to fp16 (p̃ = round(p·s); the value codes are fp16 whatever the query's dtype); Σ p̃·(c − 8) over
    the keys plus Σ p·m is each group's Σ p·v with p̃'s rounding only, weighing |c − 8| <= 8 steps; a
    column takes the rows of its own group.
No large term cancels anywhere: the first version carried BASE + c (128 or 1024 + c) through the dots and
subtracted BASE · Σ p̃ after; on an H100 it missed the reference by 3-6% of the output's range, where this
one is as close as the dequantizing kernel (docs/benchmarks.md, "The int4 quad kernel is right on CUDA").
Rows: BLOCK_G query heads (GROUP of them real) times the groups, at least 16 for the dots.

The launch's int4 decode (config.INT4_DEQUANT_MODES; launches by config.quad_launch): 1.73-1.97x the bf16
cache's speed on an H100 at ctx 8k, B = 8-64 (the dequantizing kernel: 0.75-0.92x at B = 16 / 64).
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
from kernels.nibbles import MAGIC, quads
from kernels.pdl import pdl_release, pdl_wait
from kernels.store_kv.kernel import hadamard_rows

V_MAGIC = tl.constexpr(MAGIC[torch.float16][0])  # the value codes' floats are fp16


def quads_fit(q: torch.Tensor, codes: torch.Tensor, k_group: int, v_group: int) -> bool:
    """Whether this kernel serves these operands: bf16 / fp16 queries, int4 codes viewable as int16 quads,
    groups of whole quads, and (compiled) quarters of head_dim at least an MMA step (16)."""
    head_dim = q.shape[-1]
    return (q.dtype in MAGIC and k_group % 4 == 0 and v_group % 4 == 0
            and (head_dim >= 64 or q.device.type == "cpu")
            and all(s % 2 == 0 for s in codes.stride()[:3]) and codes.storage_offset() % 2 == 0)


def rows_per_kv_head(group: int, head_dim: int, k_group: int, v_group: int) -> int:
    """BLOCK_G: query rows a program carries (a power of two >= group) so that both products have >= 16."""
    fewest = min(head_dim // k_group, head_dim // v_group)
    return max(triton.next_power_of_2(group), -(-16 // fewest))


@triton.jit
def _groups(ptr, slot, kv_head, stride_slot, valid, GROUPS: tl.constexpr, BOUNDED: tl.constexpr):
    """float32 [GROUPS, N]: one KV head's per-token group scales (or zeros) at cache slots `slot` [N]."""
    offs = slot[:, None] * stride_slot + kv_head * GROUPS + tl.arange(0, GROUPS)[None, :]
    if BOUNDED:
        vals = tl.load(ptr + offs, mask=valid[:, None], other=0.0)
    else:
        vals = tl.load(ptr + offs)
    return tl.trans(vals.to(tl.float32))


@triton.jit
def _per_row(x, BLOCK_G: tl.constexpr):
    """[GROUPS, N] → [GROUPS * BLOCK_G, N]: row (group, g) holds x[group]."""
    GROUPS: tl.constexpr = x.shape[0]
    N: tl.constexpr = x.shape[1]
    return tl.reshape(tl.broadcast_to(x[:, None, :], [GROUPS, BLOCK_G, N]), [GROUPS * BLOCK_G, N])


@triton.jit
def _attend(acc0, acc1, acc2, acc3, bias, m_i, l_i, qk0, qk1, qk2, qk3, q_sum, k_ptr, v_ptr, ks_ptr,
            kz_ptr, vs_ptr, vz_ptr, block, n0, end, kv_head, stride_cb, stride_ct, stride_ch, stride_ks,
            stride_vs, scale_log2, BLOCK_G: tl.constexpr, KG: tl.constexpr, VG: tl.constexpr,
            Q4: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, BOUNDED: tl.constexpr,
            MAGIC_BITS: tl.constexpr, PTX: tl.constexpr):
    """Online-softmax step of the BLOCK_G heads over keys [n0, n0 + BLOCK_N) in cache blocks `block`
    [BLOCK_N] (tiles.block_ids, read a tile ahead; masked past `end` when BOUNDED). Rows are group-major,
    (group, head): a thread's MMA rows are one head's groups, so sums over groups stay in its registers.
    acc0..3 [VG * BLOCK_G, Q4]: the value sums of nibble position 0..3 per (value group, head); bias
    [VG, BLOCK_G, BLOCK_N]: their affine part, per key (summed once, after the loop)."""
    DTYPE: tl.constexpr = qk0.dtype
    pos = n0 + tl.arange(0, BLOCK_N)
    valid = pos < end
    slot = block * BLOCK_SIZE + pos % BLOCK_SIZE
    offs = (block * stride_cb + (pos % BLOCK_SIZE) * stride_ct + kv_head * stride_ch)[:, None] \
        + tl.arange(0, Q4)[None, :]
    k_codes = masked_load(k_ptr + offs, valid[:, None], BOUNDED)
    k0, k1, k2, k3 = quads(k_codes, MAGIC_BITS, DTYPE, PTX, True)
    dots = tl.dot(qk0, tl.trans(k0))
    dots = tl.dot(qk1, tl.trans(k1), dots)
    dots = tl.dot(qk2, tl.trans(k2), dots)
    dots = tl.dot(qk3, tl.trans(k3), dots)  # [KG * BLOCK_G, N]: Σ q·(c − 8) per (key group, head)
    k_scale = _groups(ks_ptr, slot, kv_head, stride_ks, valid, KG, BOUNDED)
    k_mid = _groups(kz_ptr, slot, kv_head, stride_ks, valid, KG, BOUNDED) + 8.0 * k_scale
    per_group = dots * _per_row(k_scale, BLOCK_G) + _per_row(k_mid, BLOCK_G) * q_sum[:, None]
    scores = tl.sum(tl.reshape(per_group, [KG, BLOCK_G, BLOCK_N]), axis=0) * scale_log2
    if BOUNDED:
        scores = tl.where(valid[None, :], scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)

    # Values in fp16 dots whatever the query's dtype: p̃ = round(p·s) to fp16 (10 mantissa bits, not bf16's 7)
    # against the centered codes, p·v = p̃·(c − 8) + p·(z + 8s): p̃'s rounding weighs |c − 8| <= 8 steps.
    v_scale = _groups(vs_ptr, slot, kv_head, stride_vs, valid, VG, BOUNDED)
    v_mid = _groups(vz_ptr, slot, kv_head, stride_vs, valid, VG, BOUNDED) + 8.0 * v_scale
    p_scaled = (p[None, :, :] * v_scale[:, None, :]).to(tl.float16)  # [VG, BLOCK_G, N]
    bias = bias * alpha[None, :, None] + p[None, :, :] * v_mid[:, None, :]
    p_rows = tl.reshape(p_scaled, [VG * BLOCK_G, BLOCK_N])
    a_rows = tl.reshape(tl.broadcast_to(alpha[None, :], [VG, BLOCK_G]), [VG * BLOCK_G])[:, None]
    v_codes = masked_load(v_ptr + offs, valid[:, None], BOUNDED)
    v0, v1, v2, v3 = quads(v_codes, V_MAGIC, tl.float16, PTX, True)
    acc0 = tl.dot(p_rows, v0, acc0 * a_rows)
    acc1 = tl.dot(p_rows, v1, acc1 * a_rows)
    acc2 = tl.dot(p_rows, v2, acc2 * a_rows)
    acc3 = tl.dot(p_rows, v3, acc3 * a_rows)
    return acc0, acc1, acc2, acc3, bias, m_new, l_i


@triton.jit
def _own_group(acc, bias, VG: tl.constexpr, VQ: tl.constexpr):
    """[VG * BLOCK_G, Q4] value sums of one nibble position → [BLOCK_G, Q4]: each column from the rows of its
    own value group (quad i lies in group i // VQ), plus that group's bias [VG, BLOCK_G]."""
    Q4: tl.constexpr = acc.shape[1]
    BLOCK_G: tl.constexpr = acc.shape[0] // VG
    own = (tl.arange(0, Q4)[None, :] // VQ) == tl.arange(0, VG)[:, None]
    sums = tl.reshape(acc, [VG, BLOCK_G, Q4]) + bias[:, :, None]
    return tl.sum(tl.where(own[:, None, :], sums, 0.0), axis=0)


@triton.jit
def _key_rows(q_j, KG: tl.constexpr, KQ: tl.constexpr):
    """[BLOCK_G, Q4] → [KG * BLOCK_G, Q4]: row (group, g) is q_j[g] where quad i is in that group, else 0."""
    BLOCK_G: tl.constexpr = q_j.shape[0]
    Q4: tl.constexpr = q_j.shape[1]
    own = (tl.arange(0, Q4)[None, :] // KQ) == tl.arange(0, KG)[:, None]
    rows = tl.where(own[:, None, :], q_j[None, :, :], tl.zeros_like(q_j)[None, :, :])
    return tl.reshape(rows, [KG * BLOCK_G, Q4])


@triton.jit
def _int4_decode_kernel(
    q_ptr, k_ptr, v_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, block_tables_ptr, seq_lens_ptr, query_start_ptr,
    out_ptr, part_acc_ptr, part_ml_ptr, arrivals_ptr, scale_log2,
    stride_qt, stride_qh, stride_cb, stride_ct, stride_ch, stride_ks, stride_vs, stride_bt, stride_ot,
    stride_oh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, MIXED: tl.constexpr, MERGE_IN_PLACE: tl.constexpr,
    BLOCK_S: tl.constexpr, USE_PDL: tl.constexpr, K_GROUP: tl.constexpr, V_GROUP: tl.constexpr,
    HADAMARD: tl.constexpr, MAGIC_BITS: tl.constexpr, PTX: tl.constexpr,
):
    """One program: one sequence, one KV head, one KV split (kernel._decode_kernel's grid and outputs).
    k_ptr / v_ptr: the packed codes as int16 quads [blocks, block_size, Hk, HEAD_DIM / 4] (strides in
    quads); ks / kz / vs / vz: scales and zeros [blocks * block_size, Hk, groups] (slot strides)."""
    Q4: tl.constexpr = HEAD_DIM // 4
    KG: tl.constexpr = HEAD_DIM // K_GROUP
    VG: tl.constexpr = HEAD_DIM // V_GROUP
    DTYPE: tl.constexpr = tl.bfloat16 if MAGIC_BITS == 0x4300 else tl.float16
    seq, kv_head, split, row, seq_len, live_heads, per_split, start, end, block_row = decode_program(
        query_start_ptr, seq_lens_ptr, block_tables_ptr, stride_bt, GROUP, NUM_SPLITS, BLOCK_N, MIXED)
    pdl_wait(USE_PDL)
    pdl_release(USE_PDL)

    offs_g, busy, q = decode_query(q_ptr, row, kv_head, start, seq_len, stride_qt, stride_qh, GROUP, BLOCK_G,
                                   HEAD_DIM, HADAMARD)
    q = q.to(DTYPE)  # the query the dots see, and whose group sums meet the midpoints
    even, odd = tl.split(tl.reshape(q, [BLOCK_G, Q4, 2, 2]))  # value 4i + 2k + l at [i, k, l]
    q0, q2 = tl.split(even)
    q1, q3 = tl.split(odd)
    q_sum = (q0.to(tl.float32) + q1.to(tl.float32)) + (q2.to(tl.float32) + q3.to(tl.float32))
    q_sum = tl.reshape(tl.trans(tl.sum(tl.reshape(q_sum, [BLOCK_G, KG, Q4 // KG]), axis=2)), [KG * BLOCK_G])
    qk0 = _key_rows(q0, KG, K_GROUP // 4)
    qk1 = _key_rows(q1, KG, K_GROUP // 4)
    qk2 = _key_rows(q2, KG, K_GROUP // 4)
    qk3 = _key_rows(q3, KG, K_GROUP // 4)

    m_i = tl.full([BLOCK_G], NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    bias = tl.zeros([VG, BLOCK_G, BLOCK_N], tl.float32)
    acc0 = tl.zeros([VG * BLOCK_G, Q4], tl.float32)
    acc1 = tl.zeros([VG * BLOCK_G, Q4], tl.float32)
    acc2 = tl.zeros([VG * BLOCK_G, Q4], tl.float32)
    acc3 = tl.zeros([VG * BLOCK_G, Q4], tl.float32)
    full_end = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N
    block = block_ids(block_row, start, end, BLOCK_N, BLOCK_SIZE)
    for n0 in range(start, full_end, BLOCK_N):
        this_block = block
        block = block_ids(block_row, n0 + BLOCK_N, end, BLOCK_N, BLOCK_SIZE)
        acc0, acc1, acc2, acc3, bias, m_i, l_i = _attend(
            acc0, acc1, acc2, acc3, bias, m_i, l_i, qk0, qk1, qk2, qk3, q_sum, k_ptr, v_ptr, ks_ptr,
            kz_ptr, vs_ptr, vz_ptr, this_block, n0, end, kv_head, stride_cb, stride_ct, stride_ch, stride_ks,
            stride_vs, scale_log2, BLOCK_G, KG, VG, Q4, BLOCK_N, BLOCK_SIZE, False, MAGIC_BITS, PTX)
    for n0 in range(full_end, end, BLOCK_N):
        acc0, acc1, acc2, acc3, bias, m_i, l_i = _attend(
            acc0, acc1, acc2, acc3, bias, m_i, l_i, qk0, qk1, qk2, qk3, q_sum, k_ptr, v_ptr, ks_ptr,
            kz_ptr, vs_ptr, vz_ptr, block, n0, end, kv_head, stride_cb, stride_ct, stride_ch, stride_ks,
            stride_vs, scale_log2, BLOCK_G, KG, VG, Q4, BLOCK_N, BLOCK_SIZE, True, MAGIC_BITS, PTX)

    VQ: tl.constexpr = V_GROUP // 4
    bias = tl.sum(bias, axis=2)
    o0 = _own_group(acc0, bias, VG, VQ)
    o1 = _own_group(acc1, bias, VG, VQ)
    o2 = _own_group(acc2, bias, VG, VQ)
    o3 = _own_group(acc3, bias, VG, VQ)
    acc = tl.reshape(tl.join(tl.join(o0, o2), tl.join(o1, o3)), [BLOCK_G, HEAD_DIM])
    if HADAMARD:  # values were stored as v H: the weighted sum comes back by H
        acc = hadamard_rows(acc)
    store_decode(acc, m_i, l_i, out_ptr, part_acc_ptr, part_ml_ptr, arrivals_ptr, seq, kv_head, split, row,
                 seq_len, per_split, offs_g, busy, live_heads, stride_ot, stride_oh, GROUP, HEAD_DIM,
                 HEAD_DIM, NUM_SPLITS, MERGE_IN_PLACE, BLOCK_S)


def launch_int4_quads(grid: tuple[int, int, int], q: torch.Tensor, k_codes: torch.Tensor,
                      v_codes: torch.Tensor, quant: dict, meta, scale_log2: float, out: torch.Tensor,
                      part_acc: torch.Tensor, part_ml: torch.Tensor, arrivals: torch.Tensor, *, block_n: int,
                      num_warps: int, num_stages: int, mixed: bool, merge_in_place: bool, pdl: dict,
                      max_registers: int = 0, ptx: bool | None = None) -> None:
    """The kernel over kernel._launch_decode's grid and buffers (quads_fit must hold). max_registers: a
    thread's register cap on CUDA (0: none); ptx: the inline-PTX nibble conversion (default: on CUDA; the
    interpreter runs none)."""
    if q.is_cuda and max_registers:
        pdl = dict(pdl, maxnreg=max_registers)
    group = q.shape[1] // k_codes.shape[2]
    k_group, v_group = quant["K_GROUP"], quant["V_GROUP"]
    magic_bits = MAGIC[q.dtype][0]
    _int4_decode_kernel[grid](
        q, k_codes.view(torch.int16), v_codes.view(torch.int16), quant["k_scale_ptr"], quant["k_zero_ptr"],
        quant["v_scale_ptr"], quant["v_zero_ptr"], meta.block_tables, meta.seq_lens, meta.query_start_loc,
        out, part_acc, part_ml, arrivals, scale_log2,
        q.stride(0), q.stride(1), k_codes.stride(0) // 2, k_codes.stride(1) // 2, k_codes.stride(2) // 2,
        quant["stride_ks_slot"], quant["stride_vs_slot"], meta.block_tables.stride(0), out.stride(0),
        out.stride(1),
        GROUP=group, BLOCK_G=rows_per_kv_head(group, q.shape[2], k_group, v_group), HEAD_DIM=q.shape[2],
        BLOCK_SIZE=meta.block_size, BLOCK_N=block_n, NUM_SPLITS=grid[2], MIXED=mixed,
        MERGE_IN_PLACE=merge_in_place, BLOCK_S=triton.next_power_of_2(grid[2]), K_GROUP=k_group,
        V_GROUP=v_group, HADAMARD=quant["HADAMARD"], MAGIC_BITS=magic_bits,
        PTX=q.is_cuda if ptx is None else ptx, num_warps=num_warps, num_stages=num_stages, **pdl)
