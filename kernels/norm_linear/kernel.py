"""Triton RMSNorm (+ residual add) fused into a one-row GEMV (rms_norm_linear_ref's contract).

At bs1 a decode layer's two RMSNorms are latency, not bandwidth (4096 elements each), and each costs a kernel
boundary before the projection after it. Here every GEMV program first recomputes the row's mean square
itself (the row is 8 KB; it stays in L2), then streams its weight rows with the normalized input built tile by
tile. Program 0 also writes the new residual. The weight's first tile is loaded before the PDL wait.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.linear.kernel import linear_triton, weight_tile
from kernels.pdl import pdl_launch, pdl_release, pdl_wait
from kernels.rmsnorm.kernel import rms_norm_and_residual_triton

BLOCK_N, BLOCK_K, NUM_WARPS = 4, 2048, 8  # the one-row skinny GEMM's tuned tile (kernels/linear/config.py)


@triton.jit
def _summed(x_ptr, res_ptr, offs, HAS_RES: tl.constexpr):
    """x (+ residual) over offs, rounded to x's dtype as the reference's `x + residual` is."""
    s = tl.load(x_ptr + offs)
    if HAS_RES:
        s = (s.to(tl.float32) + tl.load(res_ptr + offs).to(tl.float32)).to(s.dtype)
    return s


@triton.jit
def row_rstd(x_ptr, res_ptr, res_out_ptr, K, eps, pid, offs_k, HAS_RES: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """Pass 1: 1/rms of the whole (summed) row, which every program needs; program 0 writes the summed row
    as the new residual."""
    writer = offs_k < tl.where(pid == 0, BLOCK_K, 0)  # a block mask (the interpreter rejects scalar ones)
    squares = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        s = _summed(x_ptr, res_ptr, k0 + offs_k, HAS_RES)
        if HAS_RES:
            tl.store(res_out_ptr + k0 + offs_k, s, mask=writer)
        squares += s.to(tl.float32) * s.to(tl.float32)
    return 1.0 / tl.sqrt(tl.sum(squares, axis=0) / K + eps)


@triton.jit
def normed_tile(x_ptr, res_ptr, norm_w_ptr, offs, rstd, HAS_RES: tl.constexpr):
    """Pass 2's input tile, rounded as rms_norm_ref: (s · rstd) → dtype, · norm weight → dtype, as fp32."""
    s = _summed(x_ptr, res_ptr, offs, HAS_RES)
    normed = (s.to(tl.float32) * rstd).to(s.dtype).to(tl.float32)
    return (normed * tl.load(norm_w_ptr + offs).to(tl.float32)).to(s.dtype).to(tl.float32)


@triton.jit
def _norm_gemv_kernel(
    x_ptr, res_ptr, norm_w_ptr, w_ptr, out_ptr, res_out_ptr, N, K, stride_wn, eps,
    HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n[:, None] < N
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    w = weight_tile(w_ptrs, n_mask, EVEN_N)
    pdl_release(USE_PDL)
    pdl_wait(USE_PDL)
    rstd = row_rstd(x_ptr, res_ptr, res_out_ptr, K, eps, pid, offs_k, HAS_RES, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if k0 > 0:
            w_ptrs += BLOCK_K
            w = weight_tile(w_ptrs, n_mask, EVEN_N)
        acc += w.to(tl.float32) * normed_tile(x_ptr, res_ptr, norm_w_ptr, k0 + offs_k, rstd, HAS_RES)[None, :]
    out = tl.sum(acc, axis=1)
    tl.store(out_ptr + offs_n, out.to(out_ptr.dtype.element_ty), mask=offs_n < N)


def norm_linear_supported(x: torch.Tensor, norm_weight: torch.Tensor, weight: torch.Tensor,
                          residual: torch.Tensor | None, block_k: int = BLOCK_K) -> bool:
    """One contiguous row whose width is whole K tiles, every tensor in x's dtype."""
    k = x.shape[-1]
    return (x.numel() == k and weight.shape[1] == k and k % block_k == 0 and x.is_contiguous()
            and weight.stride(1) == 1 and norm_weight.dtype == x.dtype == weight.dtype
            and (residual is None or (residual.dtype == x.dtype and residual.is_contiguous())))


def fused_rms_norm_linear(
    x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
    weight: torch.Tensor,
    block_n: int = BLOCK_N, block_k: int = BLOCK_K,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear(rms_norm(x + residual)), x + residual) for one row; callers check norm_linear_supported."""
    n, k = weight.shape
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    new_residual = torch.empty_like(x) if residual is not None else x
    _norm_gemv_kernel[(triton.cdiv(n, block_n),)](
        x, residual if residual is not None else x, norm_weight, weight, out, new_residual, n, k,
        weight.stride(0), eps, HAS_RES=residual is not None, BLOCK_N=block_n, BLOCK_K=block_k,
        EVEN_N=n % block_n == 0, num_warps=NUM_WARPS if x.is_cuda else 1, **pdl_launch(x.device),
    )
    return out, new_residual


def rms_norm_linear_triton(
    x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
    weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """rms_norm_linear_ref's contract: fused for one row, the RMSNorm kernel then linear_triton otherwise."""
    if norm_linear_supported(x, norm_weight, weight, residual):
        return fused_rms_norm_linear(x, residual, norm_weight, eps, weight)
    h, new_residual = rms_norm_and_residual_triton(x, norm_weight, eps, residual)
    return linear_triton(h, weight), new_residual
