"""Torch references of the bias-free linear (y = x Wᵀ) and of the down projection fed gate_up."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.activation.reference import silu_mul_ref


def linear_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K], weight [N, K] → [..., N]."""
    return F.linear(x, weight)


def silu_mul_linear_ref(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The MLP's down projection of its gate activation: silu_mul(gate_up) [T, I] · weight [H, I]ᵀ."""
    return F.linear(silu_mul_ref(gate_up), weight)
