"""The kernel registry: one implementation per op, chosen once (Triton on CUDA, references elsewhere)."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from kernels.activation.reference import silu_mul_ref
from kernels.attention.reference import paged_attention_ref
from kernels.linear.reference import linear_ref, silu_mul_linear_ref
from kernels.norm_linear.reference import rms_norm_linear_ref
from kernels.norm_mlp.reference import rms_norm_mlp_ref
from kernels.norm_qkv_rope.reference import rms_norm_qkv_rotary_store_ref
from kernels.quant_linear.reference import (
    silu_mul_w4a16_linear_ref,
    silu_mul_w8a8_linear_ref,
    w4a16_linear_ref,
    w8_linear_ref,
    w8a8_linear_ref,
)
from kernels.rmsnorm.reference import rms_norm_ref
from kernels.rotary.reference import apply_rotary_ref, rotary_store_kv_ref
from kernels.store_kv.reference import store_kv_ref

logger = logging.getLogger(__name__)

TORCH = "torch"
TRITON = "triton"
BACKENDS = ("auto", TORCH, TRITON)  # auto: Triton on CUDA when triton imports, the references otherwise


class KernelBackendUnavailable(RuntimeError):
    """The Triton backend was asked for where it cannot run (no triton package, or not a CUDA device)."""


@dataclass(frozen=True)
class KernelRegistry:
    """One callable per op, all from one backend; each Triton kernel keeps its torch reference's contract.

    The engine builds one (`for_device`) and binds it to the model; tests build their own.
    """

    backend: str
    paged_attention: Callable
    store_kv: Callable
    rms_norm: Callable
    apply_rotary: Callable
    rotary_store_kv: Callable
    linear: Callable
    silu_mul: Callable
    silu_mul_linear: Callable
    rms_norm_linear: Callable
    rms_norm_qkv_rotary_store: Callable
    rms_norm_mlp: Callable
    # Quantized projections (engine/quantize): int4 weights × 16-bit input, int8 weights × 16-bit input, and
    # int8 weights × per-token int8 input (optional SmoothQuant 1/s and Hadamard rotation block), and the
    # int4 and int8 × int8 ones fed the MLP's gate_up (silu(gate) · up taken in the same op);
    # kernels/quant_linear/layout's weights.
    w4a16_linear: Callable
    silu_mul_w4a16_linear: Callable
    w8_linear: Callable
    w8a8_linear: Callable
    silu_mul_w8a8_linear: Callable

    @property
    def graph_safe(self) -> bool:
        """Whether a CUDA graph can replay these kernels: the Triton ones read only device tensors and skip
        padded rows (negative slots); the torch references read host-side spans."""
        return self.backend == TRITON

    def op_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self) if f.name != "backend")

    @classmethod
    def reference(cls) -> KernelRegistry:
        """The torch references (any device)."""
        return cls(
            backend=TORCH, paged_attention=paged_attention_ref, store_kv=store_kv_ref, rms_norm=rms_norm_ref,
            apply_rotary=apply_rotary_ref, rotary_store_kv=rotary_store_kv_ref, linear=linear_ref,
            silu_mul=silu_mul_ref, silu_mul_linear=silu_mul_linear_ref, rms_norm_linear=rms_norm_linear_ref,
            rms_norm_qkv_rotary_store=rms_norm_qkv_rotary_store_ref, rms_norm_mlp=rms_norm_mlp_ref,
            w4a16_linear=w4a16_linear_ref, silu_mul_w4a16_linear=silu_mul_w4a16_linear_ref,
            w8_linear=w8_linear_ref, w8a8_linear=w8a8_linear_ref,
            silu_mul_w8a8_linear=silu_mul_w8a8_linear_ref,
        )

    @classmethod
    def triton(cls) -> KernelRegistry:
        """The Triton kernels (CUDA; CPU tensors only under TRITON_INTERPRET=1). Imported here, so that a
        CPU-only install without triton never imports them."""
        try:
            import triton  # noqa: F401
        except ImportError as err:
            raise KernelBackendUnavailable(f"triton is not importable: {err}") from err
        from kernels.activation.kernel import silu_mul_triton
        from kernels.attention.kernel import paged_attention_triton
        from kernels.linear.kernel import linear_triton, silu_mul_linear_triton
        from kernels.norm_linear.kernel import rms_norm_linear_triton
        from kernels.norm_mlp.kernel import rms_norm_mlp_triton
        from kernels.norm_qkv_rope.kernel import rms_norm_qkv_rotary_store_triton
        from kernels.quant_linear.ops import (
            silu_mul_w4a16_linear_triton,
            silu_mul_w8a8_linear_triton,
            w4a16_linear_triton,
            w8_linear_triton,
            w8a8_linear_triton,
        )
        from kernels.rmsnorm.kernel import rms_norm_triton
        from kernels.rotary.kernel import apply_rotary_triton, rotary_store_kv_triton
        from kernels.store_kv.kernel import store_kv_triton

        return cls(
            backend=TRITON, paged_attention=paged_attention_triton, store_kv=store_kv_triton,
            rms_norm=rms_norm_triton, apply_rotary=apply_rotary_triton,
            rotary_store_kv=rotary_store_kv_triton,
            linear=linear_triton, silu_mul=silu_mul_triton, silu_mul_linear=silu_mul_linear_triton,
            rms_norm_linear=rms_norm_linear_triton,
            rms_norm_qkv_rotary_store=rms_norm_qkv_rotary_store_triton, rms_norm_mlp=rms_norm_mlp_triton,
            w4a16_linear=w4a16_linear_triton, silu_mul_w4a16_linear=silu_mul_w4a16_linear_triton,
            w8_linear=w8_linear_triton, w8a8_linear=w8a8_linear_triton,
            silu_mul_w8a8_linear=silu_mul_w8a8_linear_triton,
        )

    @classmethod
    def for_device(cls, device: torch.device | str, backend: str = "auto") -> KernelRegistry:
        """`backend` auto: Triton on CUDA (the references, with a warning, if triton is missing), the
        references elsewhere; torch: the references everywhere; triton: Triton or KernelBackendUnavailable."""
        if backend not in BACKENDS:
            raise ValueError(f"kernel backend must be one of {BACKENDS}, got {backend!r}")
        device = torch.device(device)
        if backend == TORCH or (backend == "auto" and device.type != "cuda"):
            return cls.reference()
        if device.type != "cuda":
            raise KernelBackendUnavailable(f"the Triton kernels need a CUDA device, not {device}")
        try:
            return cls.triton()
        except KernelBackendUnavailable as err:
            if backend == TRITON:
                raise
            logger.warning("%s: the torch reference kernels serve %s", err, device)
            return cls.reference()
