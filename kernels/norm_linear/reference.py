"""Torch reference of RMSNorm (+ residual) followed by a linear: `rms_norm_linear_ref`."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.rmsnorm.reference import rms_norm_ref


def rms_norm_linear_ref(
    x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
    weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) · weightᵀ, x + residual); no residual (the first layer): x is the residual."""
    if residual is None:
        return F.linear(rms_norm_ref(x, norm_weight, eps), weight), x
    h, new_residual = rms_norm_ref(x, norm_weight, eps, residual)
    return F.linear(h, weight), new_residual
