"""W4A16 in Triton: y [M, N] = x [M, K] · dequant(W4Weight)ᵀ, fp32 accumulation, out in x's dtype.

A program owns BLOCK_N weight rows (contiguous packed bytes along K) and walks its share of K (split-K:
SPLIT_K programs per row block add fp32 partial sums atomically), BLOCK_K values a step. Each byte's two
nibbles are values 2b and 2b + 1, so the tile stays two [BLOCK_N, BLOCK_K / 2] halves end to end: the
inputs are read as their even and odd columns, never interleaved in registers. Dequantization is
q · scale + low in fp32 (the group's scale and low gathered per value, an L1 hit for all but the first).
  - one row: fp32 multiply-adds into a [BLOCK_N, BLOCK_K / 2] accumulator, reduced once at the end;
  - more rows: the dequantized tile (in x's dtype) on the left of tl.dot against the input tile transposed,
    [BLOCK_N, BLOCK_K / 2] × [BLOCK_K / 2, BLOCK_M], as kernels/linear does ("swap AB"); BLOCK_M = 16
    serves decode batches, larger blocks (a grid over input rows) prefill.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.quant_linear.common import dot_precision, exact_float, grid, output, rows_of, store_rows
from kernels.quant_linear.config import W4_CANDIDATES, QuantConfig, pick
from kernels.quant_linear.layout import W4Weight


@triton.jit
def _w4a16_kernel(
    x_ptr, p_ptr, s_ptr, z_ptr, out_ptr, M, N, K, stride_xm, stride_pn, stride_sn, stride_om,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, USE_DOT: tl.constexpr, EVEN_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    HALF_K: tl.constexpr = BLOCK_K // 2
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_b = tl.arange(0, HALF_K)
    k_per_split = K // SPLIT_K  # the wrapper guarantees K % (SPLIT_K * BLOCK_K) == 0
    k_start = pid_k * k_per_split
    n_mask = offs_n[:, None] < N
    rows = offs_n[:, None].to(tl.int64)
    p_row = p_ptr + rows * stride_pn
    s_row = s_ptr + rows * stride_sn
    z_row = z_ptr + rows * stride_sn
    if USE_DOT:  # input tiles transposed, [HALF_K, BLOCK_M]: the product's right operand
        x_even = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm + 2 * offs_b[:, None]
        m_mask = offs_m[None, :] < M
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        x_even = x_ptr + offs_m[:, None] * stride_xm + 2 * offs_b[None, :]
        m_mask = offs_m[:, None] < M
        acc = tl.zeros((BLOCK_N, HALF_K), dtype=tl.float32)
    for k in range(k_start, k_start + k_per_split, BLOCK_K):
        p_ptrs = p_row + (k // 2 + offs_b)[None, :]
        g = ((k + 2 * offs_b) // GROUP)[None, :]  # both nibbles of a byte share a group (GROUP is even)
        if EVEN_N:  # weights are read once a step: evict_first keeps them from pushing activations out of L2
            p = tl.load(p_ptrs, eviction_policy="evict_first")
            s = tl.load(s_row + g).to(tl.float32)
            z = tl.load(z_row + g).to(tl.float32)
        else:
            p = tl.load(p_ptrs, mask=n_mask, other=0, eviction_policy="evict_first")
            s = tl.load(s_row + g, mask=n_mask, other=0.0).to(tl.float32)
            z = tl.load(z_row + g, mask=n_mask, other=0.0).to(tl.float32)
        w_even = exact_float(p & 0xF) * s + z
        w_odd = exact_float(p >> 4) * s + z
        xe = tl.load(x_even + k, mask=m_mask, other=0.0)
        xo = tl.load(x_even + k + 1, mask=m_mask, other=0.0)
        if USE_DOT:
            acc = tl.dot(w_even.to(xe.dtype), xe, acc, input_precision=DOT_PRECISION)
            acc = tl.dot(w_odd.to(xo.dtype), xo, acc, input_precision=DOT_PRECISION)
        else:
            acc += w_even * xe.to(tl.float32) + w_odd * xo.to(tl.float32)
    if not USE_DOT:
        acc = tl.sum(acc, axis=1)[:, None]  # [BLOCK_N, 1]
    store_rows(out_ptr, acc, offs_m, offs_n, M, N, stride_om, SPLIT_K)


def w4a16_linear(x: torch.Tensor, weight: W4Weight, config: QuantConfig | None = None) -> torch.Tensor:
    """x [..., K] (bf16, fp16 or fp32) → [..., N] in x's dtype; config None: config.pick's for this shape."""
    n, k = weight.shape
    rows = rows_of(x, k)
    m = rows.shape[0]
    config = config or pick(W4_CANDIDATES, m, n, k)
    if m > 1 and config.block_m < 16 or m == 1 and config.block_m != 1:
        raise ValueError(f"W4A16: {m} rows need the {'tl.dot' if m > 1 else 'GEMV'} path, got {config}")
    if k % (config.split_k * config.block_k) or config.block_k % 2 or weight.group_size % 2:
        raise ValueError(f"W4A16: K = {k} is no multiple of split {config.split_k} × block {config.block_k}")
    if weight.scale.stride() != weight.low.stride() or weight.packed.stride(1) != 1:
        raise ValueError("W4A16: packed rows must be contiguous and scale / low laid out alike")
    out = output(m, n, x, config)
    if m:
        _w4a16_kernel[grid(m, n, config)](
            rows, weight.packed, weight.scale, weight.low, out, m, n, k, rows.stride(0),
            weight.packed.stride(0), weight.scale.stride(0), out.stride(0),
            GROUP=weight.group_size, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            SPLIT_K=config.split_k, USE_DOT=config.block_m > 1, EVEN_N=n % config.block_n == 0,
            DOT_PRECISION=dot_precision(x.dtype), num_warps=config.num_warps, num_stages=config.num_stages,
        )
    return out.to(x.dtype).view(*x.shape[:-1], n)
