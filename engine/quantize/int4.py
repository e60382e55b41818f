"""Group-wise asymmetric int4 weights from float ones, and back: w = d·q + m per group, q in 0..15.

GGUF Q4_1's own formula, so its blocks (engine/quantize/gguf_q4_1.py) and these share one representation:
the CPU modules (engine/quantize/cpu_linears.py, groups of 32) and the CUDA kernels' layout
(kernels/quant_linear/layout.pack_w4) both repack (q, d, m) triples.
"""
from __future__ import annotations

import torch

GROUP_SIZES = (32, 64, 128, 256)


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
