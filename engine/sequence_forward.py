"""The plain model forward over one token sequence in a scratch KV cache: hidden states for every position."""
from __future__ import annotations

import torch

from contracts.kv_cache_spec import KVCacheSpec, scales_for
from engine.kv_cache import KVCache, dtype_name, with_key_offsets
from engine.model import LlamaModel
from kernels.attention.metadata import AttentionMetadata, SeqSpan

_BLOCK_SIZE = 16


@torch.inference_mode()
def forward_sequence(model: LlamaModel, token_ids: list[int], kv_cache_dtype: str = "auto",
                     key_offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Final-normed hidden states [T, H] of `token_ids` at positions 0..T-1, one prefill in a fresh cache.

    The same forward the engine runs for a prompt (paged attention over a KV cache of `kv_cache_dtype`, a
    KVCacheSpec logical dtype; "auto": the model's dtype), so calibration and perplexity see exactly the
    served numerics (an int4 cache subtracts the engine's `key_offsets`, KVCache.key_offsets); the cache lives
    only for this call.
    """
    return prefill_cache(model, token_ids, kv_cache_dtype, key_offsets)[0]


@torch.inference_mode()
def prefill_cache(model: LlamaModel, token_ids: list[int], kv_cache_dtype: str = "auto",
                  key_offsets: torch.Tensor | None = None) -> tuple[torch.Tensor, KVCache]:
    """forward_sequence's hidden states and the cache it filled: token t's k, v at slot t of every layer."""
    c = model.config
    weight = model.embed_tokens.weight
    num_blocks = -(-len(token_ids) // _BLOCK_SIZE)
    kv_heads = model.layers[0].self_attn.num_kv_heads  # a TP rank's share once the model is sharded
    dtype = dtype_name(weight.dtype) if kv_cache_dtype == "auto" else kv_cache_dtype
    spec = KVCacheSpec(_BLOCK_SIZE, kv_heads, c.head_dim, dtype, scales_for(dtype, c.head_dim))
    kv = KVCache(with_key_offsets(spec, key_offsets), c.num_layers, num_blocks, weight.device, key_offsets)
    span = SeqSpan(0, len(token_ids), len(token_ids), tuple(range(num_blocks)), 0)
    meta = AttentionMetadata.from_spans([span], list(range(len(token_ids))), _BLOCK_SIZE, weight.device)
    ids = torch.tensor(token_ids, device=weight.device)
    return model(ids, torch.arange(len(token_ids), device=weight.device), meta, kv), kv
