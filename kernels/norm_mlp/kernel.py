"""Triton MLP input for a few decode rows: the gate_up projection with silu(gate) · up in its epilogue.

For 2..16 rows the gate_up projection is the skinny GEMM's tensor-core path (kernels/linear) and silu_mul
was a kernel of its own after it; computing the activation while building the down projection's input
tiles starves that path's pipeline (docs/benchmarks.md). Here each program owns BLOCK_N gate rows j.. and
the up rows I + j.. (two weight tiles, two accumulators over the same x tiles), rounds both products to the
activation dtype as the unfused GEMM stores them, and writes silu(gate) · up rounded as silu_mul_ref:
[M, I] instead of [M, 2I], one kernel less per layer.

rms_norm_mlp_triton serves the whole MLP (rms_norm_mlp_ref's contract) and picks the path per row count.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.linear.config import SHARED_MEMORY_BUDGET, SKINNY_MAX_M, pick_config
from kernels.linear.kernel import accumulate_tile, linear_triton, silu_mul_linear_triton, weight_tile
from kernels.norm_linear.kernel import rms_norm_linear_triton
from kernels.pdl import pdl_launch, pdl_release, pdl_wait
from kernels.rmsnorm.kernel import rms_norm_and_residual_triton


@triton.jit
def _gated_gemm_kernel(
    x_ptr, w_ptr, out_ptr, M, INTER, K, stride_xm, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    gate_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    up_ptrs = gate_ptrs + INTER.to(tl.int64) * stride_wn
    x_ptrs = x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None]  # x tiles transposed: [BLOCK_K, BLOCK_M]
    n_mask = offs_n[:, None] < INTER
    m_mask = offs_m[None, :] < M
    gate = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    w_gate = weight_tile(gate_ptrs, n_mask, EVEN_N)  # before the PDL wait: weights never change
    w_up = weight_tile(up_ptrs, n_mask, EVEN_N)
    pdl_release(USE_PDL)
    pdl_wait(USE_PDL)
    gate = accumulate_tile(gate, w_gate, x_ptrs, m_mask, K, True, DOT_PRECISION, False)
    up = accumulate_tile(up, w_up, x_ptrs, m_mask, K, True, DOT_PRECISION, False)
    for _ in range(BLOCK_K, K, BLOCK_K):
        gate_ptrs += BLOCK_K
        up_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        w_gate = weight_tile(gate_ptrs, n_mask, EVEN_N)
        w_up = weight_tile(up_ptrs, n_mask, EVEN_N)
        gate = accumulate_tile(gate, w_gate, x_ptrs, m_mask, K, True, DOT_PRECISION, False)
        up = accumulate_tile(up, w_up, x_ptrs, m_mask, K, True, DOT_PRECISION, False)
    # Rounded as the unfused path: gate_up stored in the activation dtype, silu rounded before the product.
    dtype = out_ptr.dtype.element_ty
    g = gate.to(dtype).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    out = act * up.to(dtype).to(tl.float32)
    o_ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
    tl.store(o_ptrs, out.to(dtype), mask=m_mask & n_mask)


def gated_supported(x: torch.Tensor, gate_up_weight: torch.Tensor) -> bool:
    """2..SKINNY_MAX_M rows of x [M, K], weight [2I, K] with unit-stride rows, K whole tiles, one dtype."""
    two_inter, k = gate_up_weight.shape
    rows = x.shape[0] if x.dim() == 2 and x.shape[1] == k else 0
    return (1 < rows <= SKINNY_MAX_M and two_inter % 2 == 0 and gate_up_weight.stride(1) == 1
            and x.stride(1) == 1 and x.dtype == gate_up_weight.dtype
            and k % pick_config(rows, two_inter // 2, k).block_k == 0)


def gated_linear(x: torch.Tensor, gate_up_weight: torch.Tensor) -> torch.Tensor:
    """silu_mul_ref(linear(x, gate_up_weight)) for 2..16 rows in one kernel; callers check gated_supported."""
    rows, k = x.shape
    inter = gate_up_weight.shape[0] // 2
    config = pick_config(rows, inter, k)  # the tile of one half: each program streams two of them
    block_m = 16
    num_stages = config.num_stages
    per_stage = (block_m + 2 * config.block_n) * config.block_k * x.element_size()
    while num_stages > 1 and num_stages * per_stage > SHARED_MEMORY_BUDGET:
        num_stages -= 1
    out = torch.empty((rows, inter), dtype=x.dtype, device=x.device)
    _gated_gemm_kernel[(triton.cdiv(inter, config.block_n),)](
        x, gate_up_weight, out, rows, inter, k, x.stride(0), gate_up_weight.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, EVEN_N=inter % config.block_n == 0,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps if x.is_cuda else 1, num_stages=num_stages,
        **pdl_launch(x.device),
    )
    return out


def rms_norm_mlp_triton(
    x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
    gate_up_weight: torch.Tensor, down_weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """rms_norm_mlp_ref's contract. One row: RMSNorm fused into the gate_up GEMV, SiLU·up into the down GEMV's
    prologue; 2..16 rows: the norm, the gated GEMM above, the down GEMM; more: the same ops unfused."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] > 1 and gated_supported(rows, gate_up_weight):
        h, new_residual = rms_norm_and_residual_triton(x, norm_weight, eps, residual)
        act = gated_linear(h.reshape(rows.shape), gate_up_weight)
        return linear_triton(act, down_weight).view(*x.shape[:-1], -1), new_residual
    gate_up, new_residual = rms_norm_linear_triton(x, residual, norm_weight, eps, gate_up_weight)
    out = silu_mul_linear_triton(gate_up.reshape(-1, gate_up.shape[-1]), down_weight)
    return out.view(*x.shape[:-1], -1), new_residual
