"""Quantized projections whose product is a kernel-registry op: Triton on CUDA, torch references elsewhere.

What a weight scheme puts in on CUDA (and, for w8, everywhere): the weights in kernels/quant_linear/layout's
formats, held as buffers so `.to()` and state dicts see them. The MLP's down projection (`silu_mul_input`)
takes gate_up: W4A16 and W8A8 through ops that take silu(gate) · up from it themselves (the W4A16 one-row
GEMV in its prologue, W8A8 quantizing it as it reads), w8 through the registry's silu_mul first. Nothing
here reads a tensor's values on the host or branches on them, so a CUDA graph can capture the forward.
"""
from __future__ import annotations

import torch
from torch import nn

from kernels.linear.modules import Linear
from kernels.quant_linear.layout import W4Weight, W8Weight
from kernels.registry import KernelRegistry


class _QuantProjection(nn.Module):
    kernels: KernelRegistry = Linear.kernels  # the torch references until the model's bind_kernels

    def __init__(self, out_features: int, in_features: int, silu_mul_input: bool) -> None:
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.silu_mul_input = silu_mul_input

    def input_of(self, x: torch.Tensor) -> torch.Tensor:
        """The product's input: x, or silu(gate) · up for the down projection fed gate_up."""
        return self.kernels.silu_mul(x) if self.silu_mul_input else x


class W4A16KernelLinear(_QuantProjection):
    """Group-wise int4 weights (W4Weight: packed nibbles, float16 scale and low per group), 16-bit input."""

    def __init__(self, weight: W4Weight, silu_mul_input: bool = False) -> None:
        super().__init__(*weight.shape, silu_mul_input)
        self.group_size = weight.group_size
        self.register_buffer("packed", weight.packed)
        self.register_buffer("scale", weight.scale)
        self.register_buffer("low", weight.low)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = W4Weight(self.packed, self.scale, self.low, self.group_size)
        if self.silu_mul_input:  # one op: the one-row kernel takes silu(gate) · up in its prologue
            return self.kernels.silu_mul_w4a16_linear(x, weight)
        return self.kernels.w4a16_linear(x, weight)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, group={self.group_size}"


class W8KernelLinear(_QuantProjection):
    """Weight-only int8: per-output-channel int8 weights (W8Weight), input in the compute dtype."""

    def __init__(self, weight: W8Weight, silu_mul_input: bool = False) -> None:
        super().__init__(*weight.shape, silu_mul_input)
        self.register_buffer("weight_int8", weight.q)
        self.register_buffer("weight_scale", weight.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.w8_linear(self.input_of(x), W8Weight(self.weight_int8, self.weight_scale))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}"


class W8A8KernelLinear(W8KernelLinear):
    """W8A8: the int8 weight of SmoothQuant-scaled, Hadamard-rotated (w · s) · H / b; the input is multiplied
    by 1/s, rotated by H in blocks of `rotation_block` and quantized per token inside the op
    (engine/quantize/w8a8.py's CPU module computes the same). Fed gate_up (the down projection), the
    registry's silu_mul_w8a8_linear quantizes silu(gate) · up straight from it."""

    def __init__(self, weight: W8Weight, inv_smooth: torch.Tensor, rotation_block: int,
                 silu_mul_input: bool = False) -> None:
        super().__init__(weight, silu_mul_input)
        self.rotation_block = rotation_block
        self.register_buffer("inv_smooth", inv_smooth.float().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = W8Weight(self.weight_int8, self.weight_scale)
        if self.silu_mul_input:
            return self.kernels.silu_mul_w8a8_linear(x, weight, self.inv_smooth, self.rotation_block)
        return self.kernels.w8a8_linear(x, weight, self.inv_smooth, self.rotation_block)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rotation={self.rotation_block}"
