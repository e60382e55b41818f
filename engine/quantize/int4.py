"""W4A16: group-wise asymmetric int4 weights served by torch's CPU int4 kernel with bfloat16 activations.

Every scheme here writes a weight as w = d·q + m per group of `group_size` input features, q in 0..15 (GGUF
Q4_1's own formula, so its blocks load as they are). torch's int4 kernel computes w = scale·(q − 8) + zero
(checked in tests/unit/test_quantize_int4.py), so zero = m + 8·d. On this AVX2 box only its bfloat16
activation path is vectorized (fp32 activations run ~20x slower than an fp32 GEMV; docs/benchmarks.md), so
activations and (scale, zero) are bfloat16: that is the "A16".
"""
from __future__ import annotations

import torch
from torch import nn

from kernels.activation.reference import silu_mul_ref

GROUP_SIZES = (32, 64, 128, 256)  # what torch's int4 kernel accepts


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float weight [N, K] → (q uint8 [N, K] in 0..15, d [N, K/g], m [N, K/g]) with w ≈ d·q + m per group:
    m is the group minimum and d spans min..max in 15 steps (error ≤ d/2 per weight)."""
    n, k = weight.shape
    if group_size not in GROUP_SIZES or k % group_size:
        raise ValueError(f"group size {group_size} must be one of {GROUP_SIZES} and divide in_features {k}")
    groups = weight.float().reshape(n, k // group_size, group_size)
    low, high = groups.amin(-1), groups.amax(-1)
    d = ((high - low) / 15).clamp_min(torch.finfo(torch.float32).tiny)
    q = ((groups - low.unsqueeze(-1)) / d.unsqueeze(-1)).round_().clamp_(0, 15).to(torch.uint8)
    return q.reshape(n, k), d, low


def dequantize_int4(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """(q [N, K], d, m [N, K/g]) → float32 [N, K] = d·q + m (what every int4 path is tested against)."""
    n, k = q.shape
    groups = q.reshape(n, d.shape[1], -1).float()
    return (groups * d.float().unsqueeze(-1) + m.float().unsqueeze(-1)).reshape(n, k)


class Int4Linear(nn.Module):
    """Bias-free linear over int4 weights packed once for torch's CPU kernel (`_weight_int4pack_mm_for_cpu`).

    Holds 4 bits per weight plus a (scale, zero) pair per group in `act_dtype`, the dtype the kernel runs its
    activations in (bfloat16: the fast path; float32: exact up to fp32 rounding, slow on AVX2); no float copy
    of the weight. `silu_mul_input`: it replaces the MLP's down projection (its input is gate_up).
    """

    def __init__(self, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor, silu_mul_input: bool = False,
                 act_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.act_dtype = act_dtype
        self.out_features, self.in_features = q.shape
        self.group_size = self.in_features // d.shape[1]
        if self.group_size not in GROUP_SIZES or self.group_size * d.shape[1] != self.in_features:
            raise ValueError(f"int4 groups of {self.group_size} over {self.in_features} inputs: "
                             f"torch's kernel takes one of {GROUP_SIZES}")
        self.silu_mul_input = silu_mul_input
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        self.register_buffer("packed", packed)
        zero = d.float() * 8 + m.float()  # torch's convention: w = scale·(q − 8) + zero
        scale_zero = torch.stack((d.float().t(), zero.t()), dim=-1)  # [K/g, N, 2]
        self.register_buffer("scale_zero", scale_zero.to(act_dtype).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.silu_mul_input:
            x = silu_mul_ref(x)
        rows = x.reshape(-1, self.in_features).to(self.act_dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, self.group_size, self.scale_zero)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, group={self.group_size}, "
                f"activations={self.act_dtype}")
