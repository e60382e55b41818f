"""Arrival counters for split-K launches whose last split merges the partials itself (no second kernel).

Zero between launches (the merging program resets its counter), so every launch on a stream may share them,
and launches on other streams get their own. Never freed or replaced while the process lives: captured CUDA
graphs hold their addresses. kernels/attention's decode and kernels/quant_linear's split-K products use them.
"""
from __future__ import annotations

import torch

_ARRIVALS: dict[tuple[torch.device, int], list[torch.Tensor]] = {}
_MIN_ARRIVALS = 4096


def arrival_counters(device: torch.device, count: int) -> torch.Tensor:
    """int32 zeros, at least `count`, for in-place merges launched on `device`'s current stream."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    held = _ARRIVALS.setdefault((device, stream), [])
    if not held or held[-1].numel() < count:
        held.append(torch.zeros(max(count, _MIN_ARRIVALS), dtype=torch.int32, device=device))
    return held[-1]
