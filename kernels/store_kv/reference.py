"""The torch KV store: every torch path writes new k, v rows into the paged cache through `store_kv_ref`."""
from __future__ import annotations

import torch


def store_kv_ref(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """k, v [T, Hk, D] → cache slots `slot_mapping` [T] of k_cache/v_cache [num_blocks, block_size, Hk, D].

    The caches are taken as tensors, their dtype decides the stored format: a quantized cache grows this one
    function (its scale tensors beside k_cache/v_cache), not its callers.
    """
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    if k.dtype != k_cache.dtype:
        k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)
