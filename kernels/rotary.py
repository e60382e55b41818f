"""Rotary embedding in HF's rotate-half layout: `apply_rotary(q, k, cos, sin)` → rotated (q, k)."""
from __future__ import annotations

import torch

from kernels import dispatch


def _rotate(x: torch.Tensor, cos_full: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    # [x1, x2] → [x1·cos − x2·sin, x2·cos + x1·sin], written as x·[cos, cos] + [x2, x1]·[−sin, sin]
    return x * cos_full + torch.cat((x2, x1), dim=-1) * sin_signed


@dispatch.register("apply_rotary", dispatch.TORCH)
def apply_rotary_ref(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hk, D], cos/sin [T, D/2] (one row per token's position) → new (q, k)."""
    # Full-width tables once, shared by q and k (bs1 decode on CPU is bound by tiny-op overhead).
    cos_full = torch.cat((cos, cos), dim=-1).unsqueeze(1)
    sin_signed = torch.cat((-sin, sin), dim=-1).unsqueeze(1)
    return _rotate(q, cos_full, sin_signed), _rotate(k, cos_full, sin_signed)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return dispatch.lookup("apply_rotary", q.device)(q, k, cos, sin)
