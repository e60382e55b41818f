"""What the launch heuristics read off the device: its SM count (attention's split choice, the stationary
W4A16 GEMV's grid)."""
from __future__ import annotations

import functools

import torch


@functools.cache
def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # interpreter: any small number; it only shapes the launch heuristics
    return torch.cuda.get_device_properties(device).multi_processor_count
