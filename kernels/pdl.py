"""Programmatic dependent launch (PDL, Hopper and newer): a kernel may start while the one before it drains.

At bs1 a decode step is a few hundred short kernels, and each boundary costs the GPU a drain and a ramp (the
next kernel starts only once the last block of the one before has finished). With PDL the next kernel's
blocks are scheduled during the previous kernel's last wave, on the SMs it frees. The protocol, for every
kernel launched with `**pdl_launch(device)` (its USE_PDL constexpr set):
  - before `pdl_wait` it reads only what no earlier kernel writes (weights) and writes nothing: the wait
    returns once the kernel before it has completed and its writes are visible;
  - it releases its own dependents early (`pdl_release`), so the kernel after it can start its prologue.
Kernels launched without it (torch's, the interpreter's, older GPUs) keep plain stream order. Because every
PDL kernel waits for its predecessor to complete, and completes only after its own wait, completion stays
ordered along the stream.

Every decode kernel uses it on Hopper (the measured gains, at bs1 and at bs16 once multi-row GEMMs put the
weight tile on the left of tl.dot, are in docs/benchmarks.md).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@functools.cache
def _enabled(device_index: int) -> bool:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def pdl_launch(device: torch.device) -> dict:
    """Launch options (spread into the kernel call) and the kernel's USE_PDL constexpr."""
    if device.type != "cuda" or not _enabled(device.index if device.index is not None else 0):
        return {"USE_PDL": False}
    return {"USE_PDL": True, "launch_pdl": True}


@triton.jit
def pdl_wait(USE_PDL: tl.constexpr):
    """Block until the kernel before this one has completed (its writes visible). No-op without PDL."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def pdl_release(USE_PDL: tl.constexpr):
    """Let the kernel after this one be scheduled as SMs free up. No-op without PDL."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
