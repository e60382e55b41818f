"""CPU modules for GGUF-block weights: Q4_1 projections and the Q8_0 LM head, served by kernels/cpu_quant."""
from __future__ import annotations

import torch
from torch import nn

from kernels.activation.reference import silu_mul_ref
from kernels.cpu_quant.layout import Q41Weight, Q80Weight
from kernels.cpu_quant.ops import q4_1_linear, q8_0_linear


class Q41Linear(nn.Module):
    """Bias-free linear over w = d·q + m per block of 32 (Q41Weight), fp32 activations and accumulation: the
    dequantized weights' fp32 product up to summation order, with no float copy of the weight.
    `silu_mul_input`: it replaces the MLP's down projection (its input is gate_up)."""

    def __init__(self, weight: Q41Weight, silu_mul_input: bool = False) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.silu_mul_input = silu_mul_input
        self.register_buffer("packed", weight.packed)
        self.register_buffer("d", weight.d)
        self.register_buffer("m", weight.m)
        self._weight = weight  # over the buffers: a frozen dataclass costs ~3 µs to build, a bs1 GEMV ~50

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.silu_mul_input:
            x = silu_mul_ref(x)
        weight = self._weight
        if weight.packed is not self.packed:  # buffers replaced (.to(), a state dict assigned)
            weight = self._weight = Q41Weight(self.packed, self.d, self.m)
        y = q4_1_linear(x, weight)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, Q4_1 blocks of 32"


class Q80Linear(nn.Module):
    """Bias-free linear over w = d·q per block of 32 (Q80Weight), fp32 activations and accumulation: the LM
    head over the GGUF's Q8_0 blocks (a tied model's embedding lookup keeps its float rows; only the head
    reads these), and w8's projections on CPU (per-channel int8, the channel's scale in every block).
    `silu_mul_input`: see Q41Linear."""

    def __init__(self, weight: Q80Weight, silu_mul_input: bool = False) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.silu_mul_input = silu_mul_input
        self.register_buffer("q", weight.q)
        self.register_buffer("d", weight.d)
        self._weight = weight  # see Q41Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.silu_mul_input:
            x = silu_mul_ref(x)
        weight = self._weight
        if weight.q is not self.q:
            weight = self._weight = Q80Weight(self.q, self.d)
        y = q8_0_linear(x, weight)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, Q8_0 blocks of 32"
