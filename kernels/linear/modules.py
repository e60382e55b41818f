"""Bias-free linear modules whose products go through their kernel registry's `linear` ops."""
from __future__ import annotations

import torch
from torch import nn

from kernels.registry import KernelRegistry


class Linear(nn.Linear):
    """nn.Linear without bias whose product is `kernels.linear` (the Triton skinny GEMM on CUDA).

    `kernels` starts as the torch references; the engine binds its own registry (engine/model.py).
    """

    kernels: KernelRegistry = KernelRegistry.reference()

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.linear(x, self.weight)


class SiluMulLinear(Linear):
    """The down projection, fed the gate_up output: forward(gate_up) = linear(silu_mul(gate_up), weight).

    One module so that CUDA can fuse the activation into the product (silu_mul_linear).
    """

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.kernels.silu_mul_linear(gate_up, self.weight)
