"""Weight-only int8 (w8) in Triton for decode: y [M ≤ 16, N] = x [M, K] · (q · scale)ᵀ, out in x's dtype.

The skinny GEMM of kernels/linear over int8 weight rows (half the bytes of bf16): one row multiplies in fp32
into a [BLOCK_N, BLOCK_K] accumulator; up to 16 rows put the weight tile (converted to x's dtype, exact for
|q| ≤ 127) on the left of tl.dot. The per-channel scale multiplies once, in the epilogue. The K loop asks
Triton to pipeline it (`tl.range(num_stages=...)`: weight tiles copied by cp.async that many steps ahead):
Triton pipelines a loop on its own only where its loads feed a tl.dot, so one row read a tile at a time.
Under programmatic dependent launch (kernels/pdl.py) one row reads its first weight tile before waiting for
the kernel before; rows in tl.dot wait first, so that the pipeline's prologue reads the first tiles ahead.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.linear.kernel import first_tiles, first_weight_tile, weight_tile
from kernels.pdl import pdl_launch, pdl_release, pdl_wait
from kernels.quant_linear.common import dot_precision, exact_float, grid, outputs, rows_of, store_rows
from kernels.quant_linear.config import FEW_ROWS, W8_CANDIDATES, QuantConfig, pick
from kernels.quant_linear.layout import W8Weight


@triton.jit
def _w8_step(acc, w, x_ptrs, m_mask, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc += one K tile's products: the int8 weight tile w against the input tile at x_ptrs."""
    x = tl.load(x_ptrs, mask=m_mask, other=0.0)
    if USE_DOT:
        acc = tl.dot(w.to(x.dtype), x, acc, input_precision=DOT_PRECISION)
    else:  # q + 128 in 1..255 converts exactly via the mantissa trick (common.exact_float)
        acc += (exact_float(w.to(tl.int32) + 128) - 128.0) * x.to(tl.float32)
    return acc


@triton.jit
def _w8_kernel(
    x_ptr, w_ptr, scale_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    USE_DOT: tl.constexpr, EVEN_N: tl.constexpr, DOT_PRECISION: tl.constexpr, STAGES: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    k_per_split = K // SPLIT_K  # the wrapper guarantees K % (SPLIT_K * BLOCK_K) == 0
    k_start = tl.multiple_of(pid_k * k_per_split, BLOCK_K)  # lets the loads vectorize to 16 B
    w_ptrs, n_mask, x_ptrs, m_mask, acc = first_tiles(
        x_ptr, w_ptr, offs_m, offs_n, offs_k, k_start, M, N, stride_xm, stride_wn, BLOCK_M, BLOCK_N, BLOCK_K,
        USE_DOT)
    first = 0
    if not USE_DOT:  # one row: the first weight tile streams in while the kernel before drains
        w = first_weight_tile(w_ptrs, n_mask, EVEN_N, USE_PDL)
        acc = _w8_step(acc, w, x_ptrs, m_mask, USE_DOT, DOT_PRECISION)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        first = BLOCK_K
    else:  # rows in tl.dot: the pipeline's own prologue reads ahead; peeling a tile delayed it (measured)
        pdl_release(USE_PDL)
        pdl_wait(USE_PDL)
    for _ in tl.range(first, k_per_split, BLOCK_K, num_stages=STAGES):
        acc = _w8_step(acc, weight_tile(w_ptrs, n_mask, EVEN_N), x_ptrs, m_mask, USE_DOT, DOT_PRECISION)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    if not USE_DOT:
        acc = tl.sum(acc, axis=1)[:, None]  # [BLOCK_N, 1]
    scale = tl.load(scale_ptr + offs_n, mask=offs_n < N, other=0.0)
    store_rows(out_ptr, acc * scale[:, None], offs_m, offs_n, M, N, stride_om, SPLIT_K)


def w8_linear(x: torch.Tensor, weight: W8Weight, config: QuantConfig | None = None) -> torch.Tensor:
    """x [..., K] with at most FEW_ROWS rows → [..., N] in x's dtype; config None: config.pick's."""
    n, k = weight.shape
    rows = rows_of(x, k)
    m = rows.shape[0]
    if m > FEW_ROWS:
        raise ValueError(f"w8 GEMV serves at most {FEW_ROWS} rows, got {m}")
    config = config or pick(W8_CANDIDATES, m, n, k)
    if (m > 1) != (config.block_m > 1) or k % (config.split_k * config.block_k) or weight.q.stride(1) != 1:
        raise ValueError(f"w8: {m} rows, K = {k} do not fit {config}")
    if config.partials:
        raise ValueError(f"w8 adds split-K partials atomically: partials=True does not fit {config}")
    buffers = outputs(m, n, x, config)
    out = buffers.out
    if m:
        _w8_kernel[grid(m, n, config)[:2]](
            rows, weight.q, weight.scale, out, m, n, k, rows.stride(0), weight.q.stride(0), out.stride(0),
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_K=config.split_k,
            USE_DOT=config.block_m > 1, EVEN_N=n % config.block_n == 0, DOT_PRECISION=dot_precision(x.dtype),
            STAGES=config.num_stages, num_warps=config.num_warps, num_stages=config.num_stages,
            **pdl_launch(x.device),
        )
    return buffers.result(x, n)
