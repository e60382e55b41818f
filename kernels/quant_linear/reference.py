"""The quantized linears in torch (dequantize, fp32 matmul): what the Triton kernels are tested against."""
from __future__ import annotations

import torch

from kernels.activation.reference import silu_mul_ref
from kernels.quant_linear.layout import W4Weight, W8Weight, unpack_w4

INT8_MAX = 127
_TINY = torch.finfo(torch.float32).tiny


def dequantize_w4(weight: W4Weight) -> torch.Tensor:
    """float32 [N, K] = q · scale + low per group."""
    n, k = weight.shape
    q = unpack_w4(weight).float().reshape(n, -1, weight.group_size)
    w = q * weight.scale.float().unsqueeze(-1) + weight.low.float().unsqueeze(-1)
    return w.reshape(n, k)


def w4a16_linear_ref(x: torch.Tensor, weight: W4Weight) -> torch.Tensor:
    """x [..., K] → [..., N] in x's dtype, fp32 products over the dequantized weight."""
    return (x.float() @ dequantize_w4(weight).t()).to(x.dtype)


def w8_linear_ref(x: torch.Tensor, weight: W8Weight) -> torch.Tensor:
    """Weight-only int8: x [..., K] → [..., N] = x · (q · scale)ᵀ in fp32, out in x's dtype."""
    return ((x.float() @ weight.q.float().t()) * weight.scale.float()).to(x.dtype)


def quantize_rows_ref(x: torch.Tensor, inv_smooth: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (times inv_smooth [K] first) → (int8 [M, K], float32 scale [M]): symmetric per row, rounded
    half away from zero as floor(|y| + 0.5) (the Triton kernel rounds the same way)."""
    rows = x.float() if inv_smooth is None else x.float() * inv_smooth.float()
    scale = (rows.abs().amax(dim=-1) / INT8_MAX).clamp_min(_TINY)
    y = rows / scale.unsqueeze(-1)
    q = torch.sign(y) * torch.floor(y.abs() + 0.5)
    return q.clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def int8_gemm_ref(q_x: torch.Tensor, x_scale: torch.Tensor, weight: W8Weight,
                  out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(q_x int8 [M, K], x_scale [M]) · weightᵀ → [M, N]: exact int products (fp64), both scales after."""
    acc = q_x.double() @ weight.q.double().t()
    return (acc * x_scale.double().unsqueeze(-1) * weight.scale.double()).to(out_dtype)


def w8a8_linear_ref(x: torch.Tensor, weight: W8Weight,
                    inv_smooth: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token dynamic int8 activations × per-channel int8 weights → [M, N] in x's dtype."""
    q_x, x_scale = quantize_rows_ref(x, inv_smooth)
    return int8_gemm_ref(q_x, x_scale, weight, x.dtype)


def silu_mul_quantize_rows_ref(gate_up: torch.Tensor, inv_smooth: torch.Tensor | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The MLP's down-projection input quantized: gate_up [..., 2I] → silu(gate) · up in gate_up's dtype
    (silu_mul_ref) → quantize_rows_ref over its [T, I] rows."""
    act = silu_mul_ref(gate_up)
    return quantize_rows_ref(act.reshape(-1, act.shape[-1]), inv_smooth)


def silu_mul_w4a16_linear_ref(gate_up: torch.Tensor, weight: W4Weight) -> torch.Tensor:
    """W4A16 down projection fed gate_up [..., 2I]: w4a16_linear_ref of silu_mul_ref(gate_up), [..., N]."""
    return w4a16_linear_ref(silu_mul_ref(gate_up), weight)


def silu_mul_w8a8_linear_ref(gate_up: torch.Tensor, weight: W8Weight,
                             inv_smooth: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8 down projection fed gate_up [..., 2I]: w8a8_linear_ref of silu_mul_ref(gate_up), [..., N]."""
    return w8a8_linear_ref(silu_mul_ref(gate_up), weight, inv_smooth)
