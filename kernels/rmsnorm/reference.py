"""Torch reference of RMSNorm, optionally fused with the residual add: `rms_norm_ref`."""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=64)
def _eps_tensor(eps: float, device: torch.device) -> torch.Tensor:
    """eps as an fp32 0-dim tensor: a Python float operand costs a host→tensor conversion on every call."""
    return torch.tensor(eps, dtype=torch.float32, device=device)


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Without `residual`: norm(x). With it: s = x + residual, returns (norm(s), s) — the new residual."""
    if residual is not None:
        x = x + residual
        residual = x
    # HF Llama's formula: normalize in float32, cast back, then apply the weight. mean(x²) is taken as
    # |x|² / H from one vector_norm (`.mean()` costs a reduction, a fill and a scalar division on CPU, and
    # bs1 decode is bound by per-op overhead); it differs from HF's only in fp32 rounding.
    h = x if x.dtype == torch.float32 else x.float()
    norm = torch.linalg.vector_norm(h, dim=-1, keepdim=True)
    h = h * torch.addcmul(_eps_tensor(float(eps), h.device), norm, norm, value=1.0 / h.shape[-1]).rsqrt_()
    out = weight * (h if h.dtype == x.dtype else h.to(x.dtype))
    return out if residual is None else (out, residual)
