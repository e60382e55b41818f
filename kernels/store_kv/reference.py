"""The torch KV store: every torch path writes new k, v rows into the paged cache through `store_kv_ref`."""
from __future__ import annotations

import torch

from kernels.store_kv.quant import QuantizedKV, store_rows

KVOperand = torch.Tensor | QuantizedKV  # a float cache, or a quantized one with its scales


def store_kv_ref(
    k: torch.Tensor, v: torch.Tensor, k_cache: KVOperand, v_cache: KVOperand, slot_mapping: torch.Tensor
) -> None:
    """k, v [T, Hk, D] → cache slots `slot_mapping` [T] of k_cache/v_cache [num_blocks, block_size, Hk, D].

    The caches decide the stored format: float tensors take the rows cast to their dtype, QuantizedKV caches
    quantize them on write (kernels/store_kv/quant.py), scales included. Callers never branch on it.
    """
    if isinstance(k_cache, QuantizedKV):
        store_rows(k, k_cache, slot_mapping)
        store_rows(v, v_cache, slot_mapping)
        return
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    if k.dtype != k_cache.dtype:
        k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)
