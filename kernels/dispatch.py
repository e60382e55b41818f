"""Kernel registry: each op has a torch reference, maybe a Triton version; `lookup` picks one per device."""
from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

TORCH = "torch"
TRITON = "triton"
# PDSERVE_KERNELS=torch forces the references everywhere (debugging, numerics comparisons).
_FORCED = os.environ.get("PDSERVE_KERNELS")

_REGISTRY: dict[str, dict[str, Callable]] = {}


class KernelNotFound(KeyError):
    """No implementation registered for this op (a typo, or the op module was never imported)."""


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: `@register("rms_norm", "torch")` makes `fn` the `backend` implementation of `op`."""

    def deco(fn: Callable) -> Callable:
        _REGISTRY.setdefault(op, {})[backend] = fn
        return fn

    return deco


def backends(op: str) -> tuple[str, ...]:
    return tuple(_REGISTRY.get(op, {}))


def lookup(op: str, device: torch.device) -> Callable:
    """Triton on CUDA when registered (and not forced off), the torch reference otherwise."""
    impls = _REGISTRY.get(op)
    if not impls:
        raise KernelNotFound(op)
    if device.type == "cuda" and _FORCED != TORCH and TRITON in impls:
        return impls[TRITON]
    return impls[TORCH]
