"""fp32 weights × fp32 activations on CPU via f32_linear.c: one weight pass for any row count."""
from __future__ import annotations

import torch

from kernels.cpu_quant.library import library

LANES = 8  # the kernel's vector width: K must be a multiple of it; weight rows go in pairs (N even)


def supports(weight: torch.Tensor) -> bool:
    """Whether f32_linear takes this [N, K] weight: fp32 on CPU, K a multiple of LANES, N even."""
    return (weight.dim() == 2 and weight.is_cpu and weight.dtype is torch.float32
            and weight.shape[1] % LANES == 0 and weight.shape[0] % 2 == 0)


def pack_pairs(weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """[N, K] → the kernel's layout [N / 2, K / 8, 2, 8]: rows in pairs, 8 floats of one then 8 of the other
    (each pair one sequential stream). `out`: a flat tensor of N·K floats to hold it (a huge-page arena)."""
    n, k = weight.shape
    pairs = weight.detach().float().view(n // 2, 2, k // LANES, LANES).permute(0, 2, 1, 3)
    if out is None:
        return pairs.contiguous()
    with torch.no_grad():
        return out.view(pairs.shape).copy_(pairs)


def unpack_pairs(packed: torch.Tensor) -> torch.Tensor:
    """pack_pairs' inverse: the dense [N, K] weight (a copy)."""
    half, blocks, _, _ = packed.shape
    return packed.permute(0, 2, 1, 3).reshape(2 * half, blocks * LANES)


def f32_linear(x: torch.Tensor, packed: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] → float32 [..., N] = x · Wᵀ (+ residual [..., N]), W given as pack_pairs(W).

    Each output element is computed by the same fp32 operations whatever the row count and thread count,
    so row i of a many-row product equals the one-row product of x[i] bit for bit."""
    n, k = 2 * packed.shape[0], packed.shape[1] * LANES
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features, the weight {k}")
    rows = x.reshape(-1, k)
    if not (rows.is_cpu and rows.dtype is torch.float32 and rows.is_contiguous()):
        rows = rows.float().contiguous()
    out = torch.empty(rows.shape[0], n)
    res = 0
    if residual is not None:
        residual = residual.reshape(rows.shape[0], n).float().contiguous()
        res = residual.data_ptr()
    library().f32_linear(rows.data_ptr(), rows.shape[0], k, packed.data_ptr(), n, res, out.data_ptr(),
                         torch.get_num_threads())
    return out if x.dim() == 2 else out.view(*x.shape[:-1], n)
