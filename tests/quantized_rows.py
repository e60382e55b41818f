"""KV caches for CPU path tests, and comparing what two stores wrote (kernels/store_kv/quant.py formats)."""
from __future__ import annotations

import torch

from contracts.kv_cache_spec import KVCacheSpec, scales_for
from engine.config import ModelConfig
from engine.kv_cache import KVCache
from kernels.store_kv.quant import QuantizedKV, dequantize_blocks


def assert_same_rows(a: QuantizedKV, b: QuantizedKV, blocks: list[int]) -> None:
    """The rows two stores wrote into `blocks` agree: every value within one quantization step of the other,
    and almost every code equal (stores whose sums or rotation round in another order may send a value on a
    rounding edge the other way)."""
    ids = torch.tensor(blocks)
    x, y = dequantize_blocks(a, ids, torch.float32), dequantize_blocks(b, ids, torch.float32)
    step = a.scale.index_select(0, ids).float().amax().item()
    torch.testing.assert_close(x, y, atol=step * 1.01, rtol=0)
    equal = (a.codes.index_select(0, ids) == b.codes.index_select(0, ids)).float().mean().item()
    assert equal > 0.98, f"only {equal:.1%} of the codes are equal"


def assert_same_kv(a: KVCache, b: KVCache, atol: float = 1e-6) -> None:
    """Two caches hold the same KV in every layer: float caches within atol, quantized ones as
    assert_same_rows says, over all their blocks."""
    blocks = list(range(a.num_blocks))
    for layer in range(a.num_layers):
        for x, y in zip(a.layer(layer), b.layer(layer), strict=True):
            if isinstance(x, QuantizedKV):
                assert_same_rows(x, y, blocks)
            else:
                torch.testing.assert_close(x, y, atol=atol, rtol=atol)


def cache_like(config: ModelConfig, num_blocks: int, dtype: str = "float32", block_size: int = 4) -> KVCache:
    """A CPU cache for `config` of `dtype` (float32, int8 or int4: the engine's scale formats)."""
    spec = KVCacheSpec(block_size, config.num_kv_heads, config.head_dim, dtype,
                       scales_for(dtype, config.head_dim))
    return KVCache(spec, config.num_layers, num_blocks)
