"""The kernel registry's quantized linear ops on Triton: each picks its kernel by the row bucket of the call.

Buckets (config.bucket): one row → a GEMV, up to FEW_ROWS → the weight-streaming tl.dot kernels, more →
W4A16's tiled dequant-GEMM, or for w8 a cuBLAS product over the weight converted to x's dtype (prefill is
compute-bound, so the transient copy costs little beside the product). The choice reads only shapes, fixed
per captured graph, so every path replays from a CUDA graph. The kernel modules are reached through their
module attributes at call time, so a re-decorated (interpreted) kernel module is picked up.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.quant_linear import act_quant, w4a16, w8, w8a8
from kernels.quant_linear.config import FEW_ROWS
from kernels.quant_linear.layout import W4Weight, W8Weight


def w4a16_linear_triton(x: torch.Tensor, weight: W4Weight) -> torch.Tensor:
    """reference.w4a16_linear_ref's contract; w4a16_linear picks GEMV / few-row / tiled by x's rows."""
    return w4a16.w4a16_linear(x, weight)


def silu_mul_w4a16_linear_triton(gate_up: torch.Tensor, weight: W4Weight) -> torch.Tensor:
    """reference.silu_mul_w4a16_linear_ref's contract: one kernel where the one-row pick is the stationary
    GEMV (silu(gate) · up in its prologue), the activation kernel then the product otherwise."""
    return w4a16.silu_mul_w4a16_linear(gate_up, weight)


def w8_linear_triton(x: torch.Tensor, weight: W8Weight) -> torch.Tensor:
    """reference.w8_linear_ref's contract: the int8 GEMV kernels up to FEW_ROWS rows, cuBLAS beyond."""
    n, k = weight.shape
    rows = x.reshape(-1, k)
    if rows.shape[0] <= FEW_ROWS:
        return w8.w8_linear(x, weight)
    # |q| <= 127 is exact in x's dtype; the per-channel scale multiplies the product, as in the kernels.
    y = F.linear(rows, weight.q.to(x.dtype)).float() * weight.scale
    return y.to(x.dtype).view(*x.shape[:-1], n)


def w8a8_linear_triton(x: torch.Tensor, weight: W8Weight, inv_smooth: torch.Tensor | None = None,
                       rotation_block: int = 1) -> torch.Tensor:
    """reference.w8a8_linear_ref's contract: fused per-token quantization, then the int8 GEMM."""
    return w8a8.w8a8_linear(x, weight, inv_smooth, rotation_block=rotation_block)


def silu_mul_w8a8_linear_triton(gate_up: torch.Tensor, weight: W8Weight,
                                inv_smooth: torch.Tensor | None = None,
                                rotation_block: int = 1) -> torch.Tensor:
    """reference.silu_mul_w8a8_linear_ref's contract: silu(gate) · up quantized per token in one kernel
    (act_quant.silu_mul_quantize_rows: no 16-bit activation round trip), then the int8 GEMM."""
    n = weight.shape[0]
    q_x, x_scale = act_quant.silu_mul_quantize_rows(gate_up, inv_smooth, rotation_block=rotation_block)
    return w8a8.int8_gemm(q_x, x_scale, weight, gate_up.dtype).view(*gate_up.shape[:-1], n)
