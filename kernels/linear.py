"""Bias-free linear layers `linear(x, weight)` (y = x Wᵀ), alone or fused with what runs next to them.

On CUDA a decode step's linears are skinny (a few rows against a large weight): they are bound by reading the
weight once, and the Triton skinny GEMM (kernels/triton_linear.py) streams it faster than cuBLAS does at those
shapes. Larger row counts go to cuBLAS. Off CUDA every op here runs its torch reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import dispatch
from kernels.rmsnorm import rms_norm_ref


@dispatch.register("linear", dispatch.TORCH)
def linear_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K], weight [N, K] → [..., N]."""
    return F.linear(x, weight)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if not x.is_cuda:  # dispatch serves the reference off CUDA; skip its per-call device lookup
        return F.linear(x, weight)
    return dispatch.lookup("linear", x.device)(x, weight)


class Linear(nn.Linear):
    """nn.Linear without bias whose product goes through `linear` (the Triton skinny GEMM on CUDA)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


@dispatch.register("silu_mul", dispatch.TORCH)
def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] (gate then up, as the fused projection writes them) → silu(gate) · up [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


@dispatch.register("silu_mul_linear", dispatch.TORCH)
def silu_mul_linear_ref(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The MLP's down projection of its gate activation: silu_mul(gate_up) [T, I] · weight [H, I]ᵀ."""
    return F.linear(silu_mul_ref(gate_up), weight)


def silu_mul_linear(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if not gate_up.is_cuda:
        return silu_mul_linear_ref(gate_up, weight)
    return dispatch.lookup("silu_mul_linear", gate_up.device)(gate_up, weight)


class SiluMulLinear(Linear):
    """The down projection, fed the gate_up output: forward(gate_up) = linear(silu_mul(gate_up), weight).

    One module so that CUDA can fuse the activation into the product (silu_mul_linear).
    """

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        return silu_mul_linear(gate_up, self.weight)


@dispatch.register("rms_norm_linear", dispatch.TORCH)
def rms_norm_linear_ref(
    x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
    weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) · weightᵀ, x + residual); no residual (the first layer): x is the residual."""
    if residual is None:
        return F.linear(rms_norm_ref(x, norm_weight, eps), weight), x
    h, new_residual = rms_norm_ref(x, norm_weight, eps, residual)
    return F.linear(h, weight), new_residual


def rms_norm_linear(
    x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
    weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    if not x.is_cuda:
        return rms_norm_linear_ref(x, residual, norm_weight, eps, weight)
    return dispatch.lookup("rms_norm_linear", x.device)(x, residual, norm_weight, eps, weight)


@dispatch.register("rms_norm_mlp", dispatch.TORCH)
def rms_norm_mlp_ref(
    x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
    gate_up_weight: torch.Tensor, down_weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's MLP with its norm: (down(silu_mul(gate_up(rms_norm(x + residual)))), x + residual)."""
    gate_up, new_residual = rms_norm_linear_ref(x, residual, norm_weight, eps, gate_up_weight)
    return silu_mul_linear_ref(gate_up, down_weight), new_residual


def rms_norm_mlp(
    x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
    gate_up_weight: torch.Tensor, down_weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    if not x.is_cuda:
        return rms_norm_mlp_ref(x, residual, norm_weight, eps, gate_up_weight, down_weight)
    impl = dispatch.lookup("rms_norm_mlp", x.device)
    return impl(x, residual, norm_weight, eps, gate_up_weight, down_weight)
