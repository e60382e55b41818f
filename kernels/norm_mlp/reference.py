"""Torch reference of a layer's MLP with the RMSNorm before it: `rms_norm_mlp_ref`."""
from __future__ import annotations

import torch

from kernels.linear.reference import silu_mul_linear_ref
from kernels.norm_linear.reference import rms_norm_linear_ref


def rms_norm_mlp_ref(
    x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
    gate_up_weight: torch.Tensor, down_weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's MLP with its norm: (down(silu_mul(gate_up(rms_norm(x + residual)))), x + residual)."""
    gate_up, new_residual = rms_norm_linear_ref(x, residual, norm_weight, eps, gate_up_weight)
    return silu_mul_linear_ref(gate_up, down_weight), new_residual
