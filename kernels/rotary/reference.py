"""Torch reference of rotary embedding (HF's rotate-half layout), alone and followed by the KV store."""
from __future__ import annotations

import functools

import torch

from kernels.store_kv.reference import KVOperand, store_kv_ref


def _adjacent_heads(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """[T, Hq + Hk, D] view over q and k when k's heads directly follow q's in memory, else None.

    That is the case for q and k sliced from the fused qkv output, so both rotate in one pass.
    """
    if (q.dtype != k.dtype or q.device != k.device or q.stride() != k.stride() or q.shape[0] != k.shape[0]
            or q.stride(2) != 1 or q.stride(1) != q.shape[2]
            or k.data_ptr() != q.data_ptr() + q.shape[1] * q.stride(1) * q.element_size()):
        return None
    return q.as_strided((q.shape[0], q.shape[1] + k.shape[1], q.shape[2]), q.stride())


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] → [x1·cos − x2·sin, x2·cos + x1·sin] with x = [x1, x2] along D."""
    num_tokens, num_heads, head_dim = x.shape
    halves = x.view(num_tokens, num_heads, 2, head_dim // 2)
    # x·[cos, cos] + [x2, x1]·[−sin, sin]: flipping the halves axis swaps x1 and x2 (one copy, no cat).
    out = torch.addcmul(halves * cos, halves.flip(2), sin_signed)
    return out.view(num_tokens, num_heads, head_dim)


@functools.lru_cache(maxsize=16)
def _halves_sign(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[[-1], [1]]: turns sin into the signed table [-sin, sin] over the halves axis in one multiply."""
    return torch.tensor([[-1.0], [1.0]], dtype=dtype, device=device)


def apply_rotary_ref(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hk, D], cos/sin [T, D/2] (one row per token's position) → new (q, k)."""
    num_tokens, half = cos.shape
    # Tables broadcast over heads and the halves axis (bs1 decode on CPU is bound by tiny-op overhead).
    cos4 = cos.view(num_tokens, 1, 1, half)
    sin_signed = sin.view(num_tokens, 1, 1, half) * _halves_sign(sin.dtype, sin.device)  # [T, 1, 2, D/2]
    qk = _adjacent_heads(q, k)
    if qk is None:
        return _rotate(q, cos4, sin_signed), _rotate(k, cos4, sin_signed)
    q_out, k_out = _rotate(qk, cos4, sin_signed).split_with_sizes([q.shape[1], k.shape[1]], dim=1)
    return q_out, k_out


def rotary_store_kv_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    k_cache: KVOperand, v_cache: KVOperand, slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """apply_rotary to q and k, then store_kv of the rotated k and of v; returns the rotated q."""
    q, k = apply_rotary_ref(q, k, cos, sin)
    store_kv_ref(k, v, k_cache, v_cache, slot_mapping)
    return q
