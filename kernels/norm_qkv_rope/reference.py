"""Torch reference of a layer's attention input: RMSNorm (+ residual), qkv projection, rotary, KV store."""
from __future__ import annotations

import torch

from kernels.norm_linear.reference import rms_norm_linear_ref
from kernels.rotary.reference import rotary_store_kv_ref
from kernels.store_kv.reference import KVOperand


def rms_norm_qkv_rotary_store_ref(
    x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
    weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: KVOperand, v_cache: KVOperand,
    slot_mapping: torch.Tensor, num_heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's attention input in one op: RMSNorm (+ residual), the fused qkv projection, rotary, KV store.
    Returns (rotated q [T, Hq, D], the new residual)."""
    qkv, new_residual = rms_norm_linear_ref(x, residual, norm_weight, eps, weight)
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    heads = qkv.view(qkv.shape[0], num_heads + 2 * num_kv_heads, head_dim)
    q, k, v = heads.split_with_sizes([num_heads, num_kv_heads, num_kv_heads], dim=1)
    return rotary_store_kv_ref(q, k, v, cos, sin, k_cache, v_cache, slot_mapping), new_residual
