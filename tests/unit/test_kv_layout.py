"""KVLayout: serialization round trip, mismatch messages, validation, deriving a layout from a cache."""

from __future__ import annotations

import pytest
import torch

from kv_transfer.layout import KVLayout, KVLayoutMismatch, layout_of_cache


def _layout(**overrides) -> KVLayout:
    fields = {"num_layers": 30, "block_size": 16, "num_kv_heads": 3, "head_dim": 64, "dtype": "float32"}
    fields.update(overrides)
    return KVLayout(**fields)


def test_layout_round_trips_through_bytes():
    layout = _layout(dtype="bfloat16", tp_rank=1, tp_size=2)
    assert KVLayout.from_bytes(layout.to_bytes()) == layout


def test_equal_layouts_are_compatible():
    _layout().check_compatible(_layout())


def test_mismatch_message_names_every_differing_field_with_both_values():
    with pytest.raises(KVLayoutMismatch) as info:
        _layout().check_compatible(_layout(block_size=32, dtype="bfloat16"), names=("decode", "prefill"))
    message = str(info.value)
    assert "block_size decode=16 prefill=32" in message
    assert "dtype decode='float32' prefill='bfloat16'" in message
    assert "head_dim" not in message
    assert info.value.fields == (("block_size", 16, 32), ("dtype", "float32", "bfloat16"))


def test_block_bytes_counts_one_block_of_k_for_one_layer():
    assert _layout().block_bytes() == 16 * 3 * 64 * 4
    assert _layout(dtype="bfloat16").block_bytes() == 16 * 3 * 64 * 2
    assert _layout(dtype="int4").block_bytes() == 16 * 3 * 64 // 2


@pytest.mark.parametrize(
    "bad", [{"block_size": 0}, {"dtype": "float8"}, {"tp_rank": 2, "tp_size": 2}, {"num_layers": -1}]
)
def test_invalid_layout_is_rejected(bad):
    with pytest.raises(ValueError):
        _layout(**bad)


def test_garbage_bytes_are_not_a_layout():
    with pytest.raises(ValueError, match="not a serialized KVLayout"):
        KVLayout.from_bytes(b"\x00garbage")


def test_layout_of_cache_reads_shape_and_dtype():
    caches = [torch.zeros(8, 4, 2, 16, dtype=torch.float16) for _ in range(3)]
    assert layout_of_cache(caches) == KVLayout(3, 4, 2, 16, "float16")


def test_layout_of_cache_rejects_layers_that_disagree():
    caches = [torch.zeros(8, 4, 2, 16), torch.zeros(8, 4, 2, 8)]
    with pytest.raises(ValueError, match="layer 1"):
        layout_of_cache(caches)
