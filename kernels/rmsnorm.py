"""RMSNorm (optionally fused with the residual add): `rms_norm(x, weight, eps, residual=None)`."""
from __future__ import annotations

import torch

from kernels import dispatch


@dispatch.register("rms_norm", dispatch.TORCH)
def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Without `residual`: norm(x). With it: s = x + residual, returns (norm(s), s) — the new residual."""
    if residual is not None:
        x = x + residual
        residual = x
    # HF Llama's formula and rounding order: normalize in float32, cast back, then apply the weight.
    # (F.rms_norm is not used: on CPU it costs twice the small ops, and bs1 decode is op-overhead bound.)
    h = x if x.dtype == torch.float32 else x.float()
    h = h * h.square().mean(-1, keepdim=True).add_(eps).rsqrt_()  # in place on the [T, 1] temporaries
    out = weight * (h if h.dtype == x.dtype else h.to(x.dtype))
    return out if residual is None else (out, residual)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    return dispatch.lookup("rms_norm", x.device)(x, weight, eps, residual)
