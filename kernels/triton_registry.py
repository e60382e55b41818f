"""Registers the Triton kernels with kernels.dispatch under TRITON (lazily: importing it needs no triton)."""
from __future__ import annotations

import importlib
import logging

from kernels import dispatch

logger = logging.getLogger(__name__)

# op name → (module, function) of its Triton implementation. Each op's reference module is imported too, so
# dispatch always has the TORCH fallback that `lookup` uses off CUDA.
TRITON_KERNELS: dict[str, tuple[str, str]] = {
    "paged_attention": ("kernels.triton_attention", "paged_attention_triton"),
    "store_kv": ("kernels.triton_store_kv", "store_kv_triton"),
    "rms_norm": ("kernels.triton_rmsnorm", "rms_norm_triton"),
    "apply_rotary": ("kernels.triton_rotary", "apply_rotary_triton"),
    "rotary_store_kv": ("kernels.triton_rotary", "rotary_store_kv_triton"),
    "linear": ("kernels.triton_linear", "linear_triton"),
    "silu_mul": ("kernels.triton_activation", "silu_mul_triton"),
    "silu_mul_linear": ("kernels.triton_linear", "silu_mul_linear_triton"),
    "rms_norm_linear": ("kernels.triton_norm_linear", "rms_norm_linear_triton"),
    "rms_norm_qkv_rotary_store": ("kernels.triton_norm_linear", "rms_norm_qkv_rotary_store_triton"),
    "rms_norm_mlp": ("kernels.triton_gated_linear", "rms_norm_mlp_triton"),
}
_REFERENCE_MODULES = ("kernels.attention", "kernels.rmsnorm", "kernels.rotary", "kernels.linear")

_warned_unavailable = False


def register_triton_kernels() -> None:
    """Register every Triton kernel under dispatch.TRITON. Idempotent; logs once if triton is missing."""
    global _warned_unavailable
    try:
        importlib.import_module("triton")
    except ImportError as err:  # a CPU-only install: the torch references keep serving every op
        if not _warned_unavailable:
            logger.info("triton unavailable (%s): using torch reference kernels", err)
            _warned_unavailable = True
        return
    for module in _REFERENCE_MODULES:
        importlib.import_module(module)
    for op, (module, name) in TRITON_KERNELS.items():
        # Re-registering stores the same function object again, so a second call changes nothing.
        dispatch.register(op, dispatch.TRITON)(getattr(importlib.import_module(module), name))
