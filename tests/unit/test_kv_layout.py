"""KVLayout: derived from the cache's spec, serialization round trip, mismatch messages, cache checks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from contracts.kv_cache_spec import KVCacheSpec, KVScales, ScaleKind
from engine.config import EngineConfig, ModelConfig
from engine.kv_cache import KVCache
from kv_transfer.layout import KVLayout, KVLayoutMismatch

SPEC = KVCacheSpec(block_size=16, num_kv_heads=3, head_dim=64, dtype="float32")


def _layout(num_layers: int = 30, tp_rank: int = 0, tp_size: int = 1, **spec_overrides) -> KVLayout:
    return KVLayout(dataclasses.replace(SPEC, **spec_overrides), num_layers, tp_rank, tp_size)


def test_layout_derives_from_the_caches_spec_layers_and_tp_shard():
    model = ModelConfig(name="m", vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=3,
                        num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64)
    kv = KVCache.for_model(model, EngineConfig(dtype="bfloat16", block_size=4, num_kv_blocks=6))
    layout = KVLayout(kv.spec, kv.num_layers, tp_rank=1, tp_size=2)
    assert (layout.dtype, layout.block_shape, layout.num_layers) == ("bfloat16", (4, 2, 8), 3)
    assert layout.block_bytes() == 4 * 2 * 8 * 2
    for cache in kv.k + kv.v:  # the wire shape is the cache's shape
        layout.check_cache(cache)


def test_layout_round_trips_through_bytes():
    layout = _layout(dtype="bfloat16", tp_rank=1, tp_size=2)
    assert KVLayout.from_bytes(layout.to_bytes()) == layout


def test_equal_layouts_are_compatible():
    _layout().check_compatible(_layout())


def test_mismatch_message_names_every_differing_field_with_both_values():
    with pytest.raises(KVLayoutMismatch) as info:
        _layout().check_compatible(_layout(block_size=32, dtype="bfloat16", tp_rank=1, tp_size=2),
                                   names=("decode", "prefill"))
    message = str(info.value)
    assert message == ("KV layout mismatch: block_size decode=16 prefill=32; dtype decode='float32' "
                       "prefill='bfloat16'; tp_rank decode=0 prefill=1; tp_size decode=1 prefill=2")
    assert info.value.fields[:2] == (("block_size", 16, 32), ("dtype", "float32", "bfloat16"))


def test_block_bytes_counts_one_block_of_k_for_one_layer():
    assert _layout().block_bytes() == 16 * 3 * 64 * 4
    assert _layout(dtype="bfloat16").block_bytes() == 16 * 3 * 64 * 2


def test_a_cache_with_scales_cannot_travel_yet():
    # Frames carry k and v only; a quantized layout would silently drop its scales.
    with pytest.raises(ValueError, match="does not carry per_token_head scales"):
        _layout(dtype="int8", scales=KVScales(ScaleKind.PER_TOKEN_HEAD))


@pytest.mark.parametrize("bad", [{"tp_rank": 2, "tp_size": 2}, {"num_layers": -1}, {"tp_size": 0}])
def test_invalid_layout_is_rejected(bad):
    with pytest.raises(ValueError):
        _layout(**bad)


def test_garbage_or_old_bytes_are_not_a_layout():
    with pytest.raises(ValueError, match="not a serialized KVLayout"):
        KVLayout.from_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="wire version 1 is not supported"):
        KVLayout.from_bytes(b'{"version": 1, "layout": {"num_layers": 2}}')


def test_check_cache_names_the_tensor_that_does_not_match():
    layout = _layout(num_layers=2)
    layout.check_cache(torch.zeros(5, 16, 3, 64))
    with pytest.raises(ValueError, match=r"v cache of layer 1 of shape \(5, 16, 3, 32\) and dtype float32"):
        layout.check_cache(torch.zeros(5, 16, 3, 32), "v cache of layer 1")
    with pytest.raises(ValueError, match="dtype bfloat16 does not match"):
        layout.check_cache(torch.zeros(5, 16, 3, 64, dtype=torch.bfloat16))
