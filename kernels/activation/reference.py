"""Torch reference of the gated activation: `silu_mul_ref(gate_up)` = silu(gate) · up."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] (gate then up, as the fused projection writes them) → silu(gate) · up [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)
