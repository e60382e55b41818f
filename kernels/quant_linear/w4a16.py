"""W4A16 in Triton: y [M, N] = x [M, K] · dequant(W4Weight)ᵀ, fp32 accumulation, out in x's dtype.

A program owns BLOCK_N weight rows (contiguous packed bytes along K) and walks its share of K (split-K:
SPLIT_K programs per row block add fp32 partial sums atomically), BLOCK_K values a step. Each byte's two
nibbles are values 2b and 2b + 1, so a tile stays two halves (even and odd columns) end to end: the inputs
are read as their even and odd columns, never interleaved in registers. Dequantization is q · scale + low
in fp32.
  - one row (GEMV): the tile is [BLOCK_N, groups, group / 2] bytes, so each group's scale and low load
    once and broadcast; a bf16 input loads as int32 pairs (contiguous; each half shifts into an fp32);
    fp32 multiply-adds into an accumulator of that shape, reduced once at the end;
  - more rows: the dequantized halves (in x's dtype, the group's scale gathered per value, an L1 hit after
    the first) on the left of tl.dot against the input halves transposed, [BLOCK_N, BLOCK_K / 2] ×
    [BLOCK_K / 2, BLOCK_M], as kernels/linear does ("swap AB"); BLOCK_M = 16 serves decode batches, larger
    blocks (a grid over input rows) prefill.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.quant_linear.common import dot_precision, exact_float, grid, output, rows_of, store_rows
from kernels.quant_linear.config import W4_CANDIDATES, QuantConfig, pick
from kernels.quant_linear.layout import W4Weight


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr, p_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_pn, stride_sn,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    EVEN_N: tl.constexpr, BF16_PAIRS: tl.constexpr,
):
    GROUPS: tl.constexpr = BLOCK_K // GROUP
    HALF_G: tl.constexpr = GROUP // 2
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_g = tl.arange(0, GROUPS)
    byte = offs_g[:, None] * HALF_G + tl.arange(0, HALF_G)[None, :]  # [GROUPS, HALF_G] within the tile
    k_per_split = K // SPLIT_K  # the wrapper guarantees K % (SPLIT_K * BLOCK_K) == 0
    k_start = pid_k * k_per_split
    n_mask = (offs_n < N)[:, None, None]
    rows = offs_n[:, None, None].to(tl.int64)
    p_ptrs = p_ptr + rows * stride_pn + (k_start // 2 + byte)[None, :, :]
    s_ptrs = s_ptr + rows * stride_sn + (k_start // GROUP + offs_g)[None, :, None]
    z_ptrs = z_ptr + rows * stride_sn + (k_start // GROUP + offs_g)[None, :, None]
    if BF16_PAIRS:  # x_ptr: the bf16 input seen as int32 pairs, pair b = values 2b (low half), 2b + 1
        x_ptrs = x_ptr + k_start // 2 + byte[None, :, :]
    else:
        x_ptrs = x_ptr + k_start + 2 * byte[None, :, :]
    acc = tl.zeros((BLOCK_N, GROUPS, HALF_G), dtype=tl.float32)
    for _ in range(0, k_per_split, BLOCK_K):
        if EVEN_N:  # weights are read once a step: evict_first keeps them from pushing activations out of L2
            p = tl.load(p_ptrs, eviction_policy="evict_first")
            s = tl.load(s_ptrs).to(tl.float32)
            z = tl.load(z_ptrs).to(tl.float32)
        else:
            p = tl.load(p_ptrs, mask=n_mask, other=0, eviction_policy="evict_first")
            s = tl.load(s_ptrs, mask=n_mask, other=0.0).to(tl.float32)
            z = tl.load(z_ptrs, mask=n_mask, other=0.0).to(tl.float32)
        if BF16_PAIRS:  # one contiguous (vectorized) load; a bf16 is the high half of its fp32
            pair = tl.load(x_ptrs)
            xe = (pair << 16).to(tl.float32, bitcast=True)
            xo = (pair & -65536).to(tl.float32, bitcast=True)
            x_ptrs += BLOCK_K // 2
        else:  # two strided loads
            xe = tl.load(x_ptrs).to(tl.float32)
            xo = tl.load(x_ptrs + 1).to(tl.float32)
            x_ptrs += BLOCK_K
        acc += (exact_float(p & 0xF) * s + z) * xe + (exact_float(p >> 4) * s + z) * xo
        p_ptrs += BLOCK_K // 2
        s_ptrs += GROUPS
        z_ptrs += GROUPS
    total = tl.sum(tl.sum(acc, axis=2), axis=1)[:, None]  # [BLOCK_N, 1]
    store_rows(out_ptr, total, tl.arange(0, 1), offs_n, 1, N, 0, SPLIT_K)


@triton.jit
def _w4a16_dot_kernel(
    x_ptr, p_ptr, s_ptr, z_ptr, out_ptr, M, N, K, stride_xm, stride_pn, stride_sn, stride_om,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, EVEN_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    HALF_K: tl.constexpr = BLOCK_K // 2
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_b = tl.arange(0, HALF_K)
    k_per_split = K // SPLIT_K
    k_start = pid_k * k_per_split
    n_mask = offs_n[:, None] < N
    rows = offs_n[:, None].to(tl.int64)
    p_row = p_ptr + rows * stride_pn
    s_row = s_ptr + rows * stride_sn
    z_row = z_ptr + rows * stride_sn
    # input tiles transposed, [HALF_K, BLOCK_M]: the product's right operand
    x_even = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm + 2 * offs_b[:, None]
    m_mask = offs_m[None, :] < M
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k in range(k_start, k_start + k_per_split, BLOCK_K):
        p_ptrs = p_row + (k // 2 + offs_b)[None, :]
        g = ((k + 2 * offs_b) // GROUP)[None, :]  # both nibbles of a byte share a group (GROUP is even)
        if EVEN_N:
            p = tl.load(p_ptrs, eviction_policy="evict_first")
            s = tl.load(s_row + g).to(tl.float32)
            z = tl.load(z_row + g).to(tl.float32)
        else:
            p = tl.load(p_ptrs, mask=n_mask, other=0, eviction_policy="evict_first")
            s = tl.load(s_row + g, mask=n_mask, other=0.0).to(tl.float32)
            z = tl.load(z_row + g, mask=n_mask, other=0.0).to(tl.float32)
        xe = tl.load(x_even + k, mask=m_mask, other=0.0)
        xo = tl.load(x_even + k + 1, mask=m_mask, other=0.0)
        acc = tl.dot((exact_float(p & 0xF) * s + z).to(xe.dtype), xe, acc, input_precision=DOT_PRECISION)
        acc = tl.dot((exact_float(p >> 4) * s + z).to(xo.dtype), xo, acc, input_precision=DOT_PRECISION)
    store_rows(out_ptr, acc, offs_m, offs_n, M, N, stride_om, SPLIT_K)


def w4a16_linear(x: torch.Tensor, weight: W4Weight, config: QuantConfig | None = None) -> torch.Tensor:
    """x [..., K] (bf16, fp16 or fp32) → [..., N] in x's dtype; config None: config.pick's for this shape.

    One row takes the GEMV kernel (config.block_m == 1, block_k a multiple of the group size), more rows the
    tl.dot kernel (block_m >= 16)."""
    n, k = weight.shape
    rows = rows_of(x, k)
    m = rows.shape[0]
    config = config or pick(W4_CANDIDATES, m, n, k)
    gemv = config.block_m == 1
    if gemv != (m == 1) or gemv and config.block_k % weight.group_size:
        raise ValueError(f"W4A16: {m} rows, groups of {weight.group_size}: no fit for {config}")
    if k % (config.split_k * config.block_k) or config.block_k % 2 or weight.group_size % 2:
        raise ValueError(f"W4A16: K = {k} is no multiple of split {config.split_k} × block {config.block_k}")
    if weight.scale.stride() != weight.low.stride() or weight.packed.stride(1) != 1:
        raise ValueError("W4A16: packed rows must be contiguous and scale / low laid out alike")
    out = output(m, n, x, config)
    common = dict(GROUP=weight.group_size, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                  SPLIT_K=config.split_k, EVEN_N=n % config.block_n == 0, num_warps=config.num_warps,
                  num_stages=config.num_stages)
    if gemv:
        pairs = rows.dtype == torch.bfloat16 and rows.storage_offset() % 2 == 0
        _w4a16_gemv_kernel[grid(m, n, config)[:2]](
            rows.view(torch.int32) if pairs else rows, weight.packed, weight.scale, weight.low, out, n, k,
            weight.packed.stride(0), weight.scale.stride(0), BF16_PAIRS=pairs, **common)
    elif m:
        _w4a16_dot_kernel[grid(m, n, config)](
            rows, weight.packed, weight.scale, weight.low, out, m, n, k, rows.stride(0),
            weight.packed.stride(0), weight.scale.stride(0), out.stride(0), BLOCK_M=config.block_m,
            DOT_PRECISION=dot_precision(x.dtype), **common)
    return out.to(x.dtype).view(*x.shape[:-1], n)
