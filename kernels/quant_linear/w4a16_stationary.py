"""W4A16 GEMV (one input row) with the input stationary: y [1, N] = x [1, K] · dequant(W4Weight)ᵀ.

w4a16_gemv's kernels walk K for a fixed block of rows, so every step turns a new stretch of x into the
form the nibble trick multiplies (bf16 pairs unpacked, scaled by 256 / 16, summed per group) — and a
thread that holds one weight row does that for every value it multiplies: about half of the ~7
instructions a weight value those loops issue (python -m bench.kernels.sass_mix). Here a program owns a
K slice (BLOCK_K values; the launcher's split-K is K / BLOCK_K) and prepares that slice of x once, into
registers, then streams weight rows past it: the loop over row blocks is the words GEMV's inner product
alone — per int32 word of eight nibbles four shifts, eight LOP3s and eight FMAs — plus the group affine
and one reduction per row. A program takes a run of consecutive row blocks (the grid aims at about
`per_sm` programs an SM over all splits, registers capped so that many fit; the last run may be shorter),
so the preparation is paid once a program, not once a block. At num_stages > 1 the loop over row blocks is
pipelined: Triton copies weight tiles and scales that many blocks ahead (cp.async).

A chunk is 32 values: four int32 words, one 16-byte load of a row, within one group (the group size is a
multiple of 32), so the group affine needs no cross-thread sum:
    Σ w·x = s · (Σ f·x' − Σ x') + z · Σ x  over the chunk (w4a16_gemv's windows: f = 1 + q/256 or 1 + q/16
against x' = 256·x or 16·x). Under split-K each program stores its rows' fp32 partials and counts in
once at the end; the last split of a run of rows adds them and stores the output (no second kernel, no
per-row-block atomic). Under PDL the first row block's weights load before the wait.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import triton
import triton.language as tl

from kernels.activation.kernel import silu_mul_rounded
from kernels.device import num_sms
from kernels.linear.kernel import first_weight_tile, weight_tile
from kernels.quant_linear.common import SplitOutput
from kernels.quant_linear.config import QuantConfig
from kernels.quant_linear.layout import W4Weight
from kernels.quant_linear.w4a16_gemv import group_scales, pair_floats, word_inputs, word_products, word_sums

CHUNK = 32  # values a thread's 16-byte load of a row holds (four int32 words)
_CHUNK = tl.constexpr(CHUNK)


@triton.jit
def _bf16_bits(v):
    """A bf16 value's 16 bits in the low half of an int32."""
    return v.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF


@triton.jit
def silu_mul_pairs(gate, up):
    """int32 pairs of bf16 gate and up values → pairs of silu(gate) · up, rounded as silu_mul_ref."""
    g_low, g_high = pair_floats(gate)
    u_low, u_high = pair_floats(up)
    low = silu_mul_rounded(g_low, u_low, tl.bfloat16)
    high = silu_mul_rounded(g_high, u_high, tl.bfloat16)
    return (_bf16_bits(high) << 16) | _bf16_bits(low)


@triton.jit
def stationary_input(x_ptr, k_start, K, CHUNKS: tl.constexpr, SILU_MUL: tl.constexpr):
    """The slice's bf16 input (x_ptr: int32 pairs) as x0..x7 [CHUNKS, 4]: value j of each word, even j
    × 256 and odd j × 16 (exact), and per chunk Σx' and Σx. SILU_MUL: x_ptr is a gate_up row (2K wide)
    and the input is silu(gate) · up, computed here for this slice only."""
    pair = (k_start // 2 + tl.arange(0, CHUNKS)[:, None, None] * (_CHUNK // 2)
            + tl.arange(0, 4)[None, :, None] * 4 + tl.arange(0, 4)[None, None, :])
    pairs = tl.load(x_ptr + pair)
    if SILU_MUL:
        pairs = silu_mul_pairs(pairs, tl.load(x_ptr + K // 2 + pair))
    x0, x1, x2, x3, x4, x5, x6, x7 = word_inputs(pairs)  # [CHUNKS, 4 words, 4 pairs] → [CHUNKS, 4]
    sx_scaled, sx = word_sums(x0, x1, x2, x3, x4, x5, x6, x7)
    return x0, x1, x2, x3, x4, x5, x6, x7, sx_scaled, sx


@triton.jit
def _row_block(w, s, z, x0, x1, x2, x3, x4, x5, x6, x7, sx_scaled, sx, ONE):
    """Σ over the slice of w·x for each row of the word tile w [BLOCK_N, CHUNKS · 4], with its chunks'
    scales and lows s, z [BLOCK_N, CHUNKS] (fp32): [BLOCK_N, 1] fp32. (Loaded flat, the tile gets 16-byte
    runs along K with the rows across warps; a [BLOCK_N, CHUNKS, 4] pointer tensor put rows across lanes
    and took ~50 more registers at two rows a thread.)"""
    fx = word_products(tl.reshape(w, (w.shape[0], x0.shape[0], 4)), x0, x1, x2, x3, x4, x5, x6, x7, ONE)
    return tl.sum((tl.sum(fx, axis=2) - sx_scaled[None, :]) * s + z * sx[None, :], axis=1, keep_dims=True)


@triton.jit
def _row_block_operands(w_ptrs, s_ptrs, z_ptrs, n_mask, EVEN_N: tl.constexpr):
    """One row block's word tile and its chunks' scales and lows (loaded, not yet waited on)."""
    w = weight_tile(w_ptrs, n_mask, EVEN_N)
    s, z = group_scales(s_ptrs, z_ptrs, n_mask, EVEN_N)
    return w, s, z


@triton.jit
def _store_rows(out_ptr, part_ptr, split, N, rows, mask, y, SPLIT_K: tl.constexpr):
    """A row block's sums: the output itself, or under split-K this split's fp32 partial row."""
    if SPLIT_K == 1:
        tl.store(out_ptr + rows[:, None], y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(part_ptr + split.to(tl.int64) * N + rows[:, None], y, mask=mask)


@triton.jit
def _merge_span(out_ptr, part_ptr, arrivals_ptr, row0, span, N, SPLIT_K: tl.constexpr, SPAN_P2: tl.constexpr):
    """After this split's partial rows row0 .. row0 + span are in part [SPLIT_K, N]: count in at the
    program's arrival counter; the last split to arrive resets it, adds the splits and stores out."""
    tl.debug_barrier()  # with the acq_rel atomic: this program's partials are published before it counts
    arrival = arrivals_ptr + tl.program_id(0)
    if tl.atomic_add(arrival, 1, sem="acq_rel") == SPLIT_K - 1:
        tl.atomic_xchg(arrival, 0, sem="relaxed")
        rows = row0 + tl.arange(0, SPAN_P2)
        mask = (rows < row0 + span) & (rows < N)
        total = tl.load(part_ptr + rows, mask=mask, other=0.0)
        for other in tl.static_range(1, SPLIT_K):
            total += tl.load(part_ptr + other * N + rows, mask=mask, other=0.0)
        tl.store(out_ptr + rows, total.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _w4a16_stationary_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, part_ptr, arrivals_ptr, N, K, stride_wn, stride_sn, ONE, ROW_BLOCKS,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCKS: tl.constexpr, SPAN_P2: tl.constexpr, EVEN_N: tl.constexpr, USE_PDL: tl.constexpr,
    SILU_MUL: tl.constexpr = False, STAGES: tl.constexpr = 1,
):
    CHUNKS: tl.constexpr = BLOCK_K // _CHUNK
    split = tl.program_id(1)
    row0 = tl.program_id(0) * (BLOCKS * BLOCK_N)  # this program's rows: BLOCKS row blocks from row0
    count = tl.minimum(BLOCKS, ROW_BLOCKS - tl.program_id(0) * BLOCKS)  # the last program's run is shorter
    k_start = tl.multiple_of(split * BLOCK_K, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, CHUNKS)
    word = (k_start // 8 + tl.arange(0, CHUNKS * 4))[None, :]  # [1, CHUNKS · 4]
    group = ((k_start + offs_c * _CHUNK) // GROUP)[None, :]  # [1, CHUNKS]: each chunk's scale and low
    offs_n = row0 + offs_r
    n_mask = offs_n[:, None] < N
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + word
    s_offs = offs_n[:, None].to(tl.int64) * stride_sn + group
    s, z = group_scales(s_ptr + s_offs, z_ptr + s_offs, n_mask, EVEN_N)  # weights: before the PDL wait
    w = first_weight_tile(w_ptrs, n_mask, EVEN_N, USE_PDL)
    x0, x1, x2, x3, x4, x5, x6, x7, sx_scaled, sx = stationary_input(x_ptr, k_start, K, CHUNKS, SILU_MUL)
    y = _row_block(w, s, z, x0, x1, x2, x3, x4, x5, x6, x7, sx_scaled, sx, ONE)
    _store_rows(out_ptr, part_ptr, split, N, offs_n, n_mask, y, SPLIT_K)
    for block in tl.range(1, count, num_stages=STAGES):  # STAGES > 1: loads copied that many blocks ahead
        rows = offs_n + block * BLOCK_N
        mask = rows[:, None] < N
        step = block * BLOCK_N * stride_wn
        w, s, z = _row_block_operands(w_ptrs + step, s_ptr + s_offs + block * BLOCK_N * stride_sn,
                                      z_ptr + s_offs + block * BLOCK_N * stride_sn, mask, EVEN_N)
        y = _row_block(w, s, z, x0, x1, x2, x3, x4, x5, x6, x7, sx_scaled, sx, ONE)
        _store_rows(out_ptr, part_ptr, split, N, rows, mask, y, SPLIT_K)
    if SPLIT_K > 1:
        _merge_span(out_ptr, part_ptr, arrivals_ptr, row0, count * BLOCK_N, N, SPLIT_K, SPAN_P2)


def stationary_fits(rows: torch.Tensor, weight: W4Weight, config: QuantConfig) -> str:
    """Why the stationary GEMV cannot run this product ('' when it can); rows: the input, or the gate_up
    rows its silu(gate) · up prologue reads (2K wide)."""
    n, k = weight.shape
    p = weight.packed
    if rows.shape[0] != 1 or rows.dtype != torch.bfloat16 or rows.storage_offset() % 2 or k % 2:
        return "the stationary GEMV takes one bf16 row"
    if config.block_k % CHUNK or k % config.block_k or weight.group_size % CHUNK:
        return f"K = {k} and groups of {weight.group_size} must be whole {CHUNK}-value chunks of block_k"
    if p.stride(0) % 4 or p.data_ptr() % 16:
        return "packed rows must be 16-byte aligned int32 words"
    return ""


def stationary_split(config: QuantConfig, k: int) -> QuantConfig:
    """The config as launched: split-K is K / block_k, merged in place."""
    return replace(config, split_k=k // config.block_k, partials=True)


def blocks_per_program(blocks: int, programs: int) -> int:
    """Row blocks a program takes: the fewest that cover `blocks` with at most `programs` programs (the last
    program's run may be shorter). A divisor of `blocks` kept every run equal but could leave a sixth of
    the grid's programs unlaunched (down's 512 row blocks over 75 programs: runs of 8, 64 programs)."""
    return max(1, -(-blocks // max(1, programs)))


def register_cap(config: QuantConfig) -> int:
    """Registers a thread may take so that per_sm programs of num_warps warps share an SM's 64K (whole
    eights, at most 255): 128 at four 4-warp programs."""
    return min(255, 65536 // (config.per_sm * config.num_warps * 32) // 8 * 8)


def w4a16_stationary(rows: torch.Tensor, weight: W4Weight, config: QuantConfig, buffers: SplitOutput,
                     launch: dict, silu_mul: bool = False) -> None:
    """Launch the stationary GEMV into `buffers` (common.outputs of stationary_split's config: out, and
    under split-K the fp32 partials [split_k, N] and arrival counters, one a program); silu_mul: rows are
    gate_up and the product's input is silu(gate) · up."""
    n, k = weight.shape
    blocks = triton.cdiv(n, config.block_n)
    per = blocks_per_program(blocks, max(1, num_sms(rows.device) * config.per_sm // config.split_k))
    if rows.is_cuda:  # per_sm programs must fit an SM's registers together
        launch = dict(launch, maxnreg=register_cap(config))
    _w4a16_stationary_kernel[(triton.cdiv(blocks, per), config.split_k)](
        rows.view(torch.int32), weight.packed.view(torch.int32), weight.scale, weight.low, buffers.out,
        buffers.part, buffers.arrivals, n, k, weight.packed.stride(0) // 4, weight.scale.stride(0),
        ROW_BLOCKS=blocks, BLOCKS=per, SPAN_P2=triton.next_power_of_2(per * config.block_n),
        SILU_MUL=silu_mul, STAGES=config.num_stages, **launch)
