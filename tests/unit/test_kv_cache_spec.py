"""KVCacheSpec: validation, storage shape and bytes per block for float and quantized caches."""

from __future__ import annotations

import pytest

from contracts.kv_cache_spec import KVCacheSpec, KVScales, ScaleKind, scales_for


def test_float_spec_fills_its_storage_and_has_no_scales():
    spec = KVCacheSpec(16, 8, 128, "bfloat16")
    assert (spec.storage_dtype, spec.values_per_element, spec.scales.kind) == ("bfloat16", 1, ScaleKind.NONE)
    assert spec.storage_block_shape == spec.block_shape == (16, 8, 128)
    assert spec.scale_shapes() == {} and not spec.is_quantized


@pytest.mark.parametrize("dtype, itemsize", [("float32", 4), ("float16", 2), ("bfloat16", 2)])
def test_bytes_per_block_of_a_float_cache(dtype, itemsize):
    spec = KVCacheSpec(16, 8, 128, dtype)
    assert spec.value_bytes_per_block == 16 * 8 * 128 * itemsize
    assert spec.bytes_per_block == 2 * 16 * 8 * 128 * itemsize  # k and v of one layer


def test_int8_spec_keeps_one_scale_per_token_and_head():
    spec = KVCacheSpec(16, 8, 128, "int8", scales=KVScales(ScaleKind.PER_TOKEN_HEAD, dtype="float16"))
    assert spec.storage_block_shape == (16, 8, 128) and spec.is_quantized
    assert spec.scale_shapes() == {"k_scale": (16, 8), "v_scale": (16, 8)}
    assert spec.bytes_per_block == 2 * (16 * 8 * 128 + 16 * 8 * 2)


def test_int4_spec_packs_two_values_a_byte_with_grouped_scales_and_zeros():
    spec = KVCacheSpec(16, 8, 128, "int4", scales=KVScales("grouped", group_size=16, zero_points=True,
                                                            value_group_size=32))
    assert (spec.storage_dtype, spec.values_per_element) == ("uint8", 2)
    assert spec.storage_block_shape == (16, 8, 64)
    # Both grouped along head_dim, per token: keys by group_size, values by value_group_size.
    assert spec.scale_shapes() == {"k_scale": (16, 8, 8), "v_scale": (16, 8, 4),
                                   "k_zero": (16, 8, 8), "v_zero": (16, 8, 4)}
    assert spec.bytes_per_block == 2 * 16 * 8 * 64 + 2 * (16 * 8 * 8 + 16 * 8 * 4) * 4
    assert spec.bytes_per_token == spec.bytes_per_block // 16


def test_value_groups_default_to_the_key_groups_and_scales_for_picks_each_dtypes_format():
    assert KVScales("grouped", group_size=8).value_group_size == 8
    assert scales_for("bfloat16", 64) == KVScales()
    assert scales_for("int8", 64) == KVScales("per_token_head", dtype="float16")
    int4 = scales_for("int4", 64)
    assert (int4.group_size, int4.value_group_size, int4.zero_points, int4.hadamard) == (32, 64, True, True)
    assert scales_for("int4", 16).group_size == 16  # capped at head_dim


@pytest.mark.parametrize("kwargs, message", [
    ({"dtype": "float8"}, "KV cache dtype must be one of .*'float8'"),
    ({"block_size": 0}, "block_size must be an int >= 1"),
    ({"head_dim": 7, "dtype": "int4", "scales": KVScales("grouped", 1)}, "head_dim 7 does not pack 2 values"),
    ({"dtype": "int8"}, "int8 KV cache needs scales"),
    ({"scales": KVScales("per_token_head")}, "float32 KV cache needs no scales"),
    ({"dtype": "int4", "scales": KVScales("grouped", 24)}, r"group sizes 24 \(keys\) and 24 \(values\) must "
                                                           "divide head_dim 128"),
    ({"head_dim": 96, "dtype": "int4", "scales": KVScales("grouped", 32, hadamard=True)},
     "Hadamard rotation needs a power-of-two head_dim"),
])
def test_invalid_spec_is_rejected_naming_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KVCacheSpec(**{"block_size": 16, "num_kv_heads": 8, "head_dim": 128, **kwargs})


@pytest.mark.parametrize("kwargs, message", [
    ({"kind": "per_channel"}, "scales kind must be one of"),
    ({"kind": "grouped"}, "grouped scales need group_size >= 1"),
    ({"kind": "per_token_head", "group_size": 8}, "group_size is for grouped scales only"),
    ({"zero_points": True}, "zero_points need scales"),
    ({"kind": "per_token_head", "dtype": "int8"}, "scales dtype must be one of"),
])
def test_invalid_scales_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KVScales(**kwargs)


def test_num_blocks_for_rounds_tokens_up_to_whole_blocks():
    spec = KVCacheSpec(16, 1, 8)
    assert [spec.num_blocks_for(n) for n in (1, 16, 17)] == [1, 1, 2]
    with pytest.raises(ValueError):
        spec.num_blocks_for(0)
