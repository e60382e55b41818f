"""Torch references for kernels/cpu_quant: dequantize to fp32, then the fp32 product (what the kernels equal
up to the order of fp32 additions)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.cpu_quant.layout import QK, Q41Weight, Q80Weight, unpack_q4_1


def dequantize_q4_1_ref(weight: Q41Weight) -> torch.Tensor:
    n, k = weight.shape
    q = unpack_q4_1(weight).float().view(n, k // QK, QK)
    return (q * weight.d.float().unsqueeze(-1) + weight.m.float().unsqueeze(-1)).view(n, k)


def dequantize_q8_0_ref(weight: Q80Weight) -> torch.Tensor:
    n, k = weight.shape
    return (weight.q.float().view(n, k // QK, QK) * weight.d.unsqueeze(-1)).view(n, k)


def q4_1_linear_ref(x: torch.Tensor, weight: Q41Weight) -> torch.Tensor:
    """x [..., K] → float32 [..., N] = x · dequant(W)ᵀ."""
    return F.linear(x.float(), dequantize_q4_1_ref(weight))


def q8_0_linear_ref(x: torch.Tensor, weight: Q80Weight) -> torch.Tensor:
    return F.linear(x.float(), dequantize_q8_0_ref(weight))
