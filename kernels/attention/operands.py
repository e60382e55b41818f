"""Host side of the Triton attention launches: operand checks, the quantized caches' kernel arguments, and
the dot precision per cache dtype."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kernels.store_kv.quant import QuantizedKV

if TYPE_CHECKING:
    from kernels.attention.metadata import AttentionMetadata
    from kernels.store_kv.reference import KVOperand


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 caches (CPU-parity tests) must not silently drop to tf32; bf16/fp16 ignore this.
    return "ieee" if dtype == torch.float32 else "tf32"


def quantized_args(k_cache: KVOperand, v_cache: KVOperand) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(k and v as stored, the kernels' quantization arguments): scale / zero tensors and their strides, bits,
    group sizes, rotation; None (constexprs) for float caches, whose kernels compile as before."""
    if not isinstance(k_cache, QuantizedKV):
        return k_cache, v_cache, dict(
            k_scale_ptr=None, k_zero_ptr=None, v_scale_ptr=None, v_zero_ptr=None, stride_ks_slot=None,
            stride_ks_h=None, stride_vs_slot=None, stride_vs_h=None, KV_BITS=0, K_GROUP=0, V_GROUP=0,
            HADAMARD=False)
    head_dim = k_cache.shape[3]
    if head_dim & (head_dim - 1) or not all(t.is_contiguous() for t in (k_cache.scale, v_cache.scale)):
        raise ValueError("paged_attention: quantized caches need a power-of-two head_dim, contiguous scales")
    return k_cache.codes, v_cache.codes, dict(
        k_scale_ptr=k_cache.scale, k_zero_ptr=k_cache.zero, v_scale_ptr=v_cache.scale,
        v_zero_ptr=v_cache.zero,
        stride_ks_slot=k_cache.scale.stride(1), stride_ks_h=k_cache.scale.stride(2),
        stride_vs_slot=v_cache.scale.stride(1), stride_vs_h=v_cache.scale.stride(2), KV_BITS=k_cache.bits,
        K_GROUP=k_cache.group_size, V_GROUP=v_cache.group_size, HADAMARD=k_cache.hadamard)


def check_operands(q: torch.Tensor, k_cache: KVOperand, v_cache: KVOperand, meta: AttentionMetadata) -> None:
    """Shapes are the logical ones (a QuantizedKV's too); strides those of the stored tensors."""
    if q.dim() != 3 or len(k_cache.shape) != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"paged_attention: q {tuple(q.shape)}, caches {tuple(k_cache.shape)}/{tuple(v_cache.shape)}")
    if q.shape[2] != k_cache.shape[3] or q.shape[1] % k_cache.shape[2]:
        raise ValueError(
            f"paged_attention: q heads/dim {tuple(q.shape[1:])} do not fit KV {tuple(k_cache.shape[2:])}")
    if isinstance(k_cache, QuantizedKV):
        k_cache, v_cache = k_cache.codes, v_cache.codes
    if k_cache.shape[1] != meta.block_size or k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("paged_attention: caches must share strides, be dense in D, match meta.block_size")
