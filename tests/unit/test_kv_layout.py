"""KVLayout: derived from the cache's spec, serialization round trip, mismatch messages, cache checks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from contracts.kv_cache_spec import KVCacheSpec, scales_for
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


@pytest.mark.parametrize("head_dim, kv_heads", [(64, 3), (128, 8)])  # the embedded model, Llama-3-8B
def test_quantized_layouts_put_their_budgets_on_the_wire(head_dim: int, kv_heads: int) -> None:
    ratios = {dtype: KVLayout(KVCacheSpec(16, kv_heads, head_dim, dtype, scales_for(dtype, head_dim)), 32)
              .wire_ratio_vs_bf16() for dtype in ("bfloat16", "int8", "int4")}
    assert ratios["bfloat16"] == 1.0
    assert ratios["int8"] <= 0.53 and ratios["int4"] <= 0.30
    int4 = KVLayout(KVCacheSpec(16, kv_heads, head_dim, "int4", scales_for("int4", head_dim)), 32)
    # k, v codes at half a byte a value, then float16 scale and zero per 32 (keys) / 64 (values) values
    assert int4.bytes_per_token() == kv_heads * (head_dim + 4 * head_dim // 32 + 4 * head_dim // 64)
    assert int4.scale_names() == ("k_scale", "v_scale", "k_zero", "v_zero")


def test_quantized_layout_round_trips_and_checks_its_scale_tensors() -> None:
    layout = _layout(dtype="int4", scales=scales_for("int4", 64))
    assert KVLayout.from_bytes(layout.to_bytes()) == layout
    good = [torch.zeros(5, 16, 3, 2, dtype=torch.float16), torch.zeros(5, 16, 3, 1, dtype=torch.float16)] * 2
    layout.check_scales(tuple(good))
    with pytest.raises(ValueError, match=r"scales of layer 0 .* do not match the layout's \['k_scale'"):
        layout.check_scales(tuple(good[:3]), "scales of layer 0")


def test_a_spec_mismatch_in_scales_names_both_sides() -> None:
    with pytest.raises(KVLayoutMismatch, match="dtype decode='int8' prefill='int4'.*scales.kind "
                                               "decode='per_token_head' prefill='grouped'"):
        _layout(dtype="int8", scales=scales_for("int8", 64)).check_compatible(
            _layout(dtype="int4", scales=scales_for("int4", 64)), names=("decode", "prefill"))


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
