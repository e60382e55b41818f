"""Triton attention over int8 / int4 caches equals the reference over the same blocks (interpreted on CPU),
and the reference over quantized blocks stays near float attention."""
from __future__ import annotations

import pytest
import torch

from kernels.attention.config import INT4_DEQUANT_MODES
from kernels.attention.kernel import paged_attention_triton, paged_decode_attention
from kernels.attention.reference import paged_attention_ref
from kernels.store_kv.quant import QuantizedKV, store_rows
from tests.kernels.attention.test_triton_attention import make_batch, needs_data_dependent_loops  # noqa: F401

pytestmark = pytest.mark.timeout(180)


HEAD_DIM = 32


def quantized(cache: torch.Tensor, dtype: str, group_size: int = 16) -> QuantizedKV:
    """The float cache [blocks, block_size, Hk, D] written through the torch store into a quantized one."""
    blocks, block_size, heads, dim = cache.shape
    if dtype == "int8":
        q = QuantizedKV(torch.zeros(blocks, block_size, heads, dim, dtype=torch.int8),
                        torch.zeros(blocks, block_size, heads, dtype=torch.float16))
    else:
        groups = (blocks, block_size, heads, dim // group_size)
        q = QuantizedKV(torch.zeros(blocks, block_size, heads, dim // 2, dtype=torch.uint8),
                        torch.zeros(groups, dtype=torch.float16), torch.zeros(groups, dtype=torch.float16),
                        group_size, hadamard=True)
    store_rows(cache.view(-1, heads, dim), q, torch.arange(blocks * block_size))
    return q


def quantized_batch(seqs, dtype: str, num_heads: int = 4, num_kv_heads: int = 2, block_size: int = 4,
                    seed: int = 0, value_group: int = 32):
    q, k_cache, v_cache, meta = make_batch(seqs, num_heads, num_kv_heads, HEAD_DIM, block_size, True, seed)
    return q, quantized(k_cache, dtype), quantized(v_cache, dtype, value_group), meta, (k_cache, v_cache)


@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_triton_decode_over_a_quantized_cache_matches_the_reference(dtype: str, num_splits: int) -> None:
    q, k, v, meta, _ = quantized_batch([(3, 1), (17, 1), (0, 1), (36, 1)], dtype, seed=num_splits)
    expected = paged_attention_ref(q, k, v, meta, HEAD_DIM ** -0.5)
    got = paged_decode_attention(q, k, v, meta, HEAD_DIM ** -0.5, num_splits=num_splits)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)


def test_int8_decode_under_swept_tiles_matches_the_reference() -> None:
    # 32-key tiles (the bench's sweep passes tiles): contexts of whole tiles, a ragged tail and one short key
    q, k, v, meta, _ = quantized_batch([(64, 1), (45, 1), (1, 1)], "int8", seed=5)
    expected = paged_attention_ref(q, k, v, meta, HEAD_DIM ** -0.5)
    got = paged_decode_attention(q, k, v, meta, HEAD_DIM ** -0.5, num_splits=2, tiles=(32, 1, 1))
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("int4_dequant", INT4_DEQUANT_MODES)
@pytest.mark.parametrize("key_group, value_group", [(16, 32), (8, 16)])
def test_int4_decode_under_each_dequant_mode_matches_the_reference(int4_dequant: int, key_group: int,
                                                                   value_group: int) -> None:
    # several groups a row (scales broadcast per group), a ragged tail, an empty sequence, split-K
    q, k_cache, v_cache, meta = make_batch([(3, 1), (29, 1), (0, 1), (40, 1)], 4, 2, HEAD_DIM, 4, True, 11)
    k, v = quantized(k_cache, "int4", key_group), quantized(v_cache, "int4", value_group)
    expected = paged_attention_ref(q, k, v, meta, HEAD_DIM ** -0.5)
    got = paged_decode_attention(q, k, v, meta, HEAD_DIM ** -0.5, num_splits=2, int4_dequant=int4_dequant)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_triton_prefill_and_mixed_batches_over_a_quantized_cache_match_the_reference(dtype: str) -> None:
    q, k, v, meta, _ = quantized_batch([(0, 17), (20, 1), (7, 9)], dtype, seed=7)
    expected = paged_attention_ref(q, k, v, meta, HEAD_DIM ** -0.5)
    torch.testing.assert_close(paged_attention_triton(q, k, v, meta, HEAD_DIM ** -0.5), expected,
                               atol=2e-5, rtol=2e-5)


# Random N(0, 1) rows, unit-variance queries: the output error bound of each format, measured with margin
# (int8 keeps a row to 1/254 of its max; int4 to 1/30 of its group's range, rotated).
@pytest.mark.parametrize("dtype, bound", [("int8", 0.02), ("int4", 0.25)])
def test_reference_attention_over_quantized_blocks_stays_near_float_attention(dtype: str,
                                                                               bound: float) -> None:
    q, k, v, meta, (k_float, v_float) = quantized_batch([(40, 1), (0, 12), (9, 3)], dtype, seed=3)
    exact = paged_attention_ref(q, k_float, v_float, meta, HEAD_DIM ** -0.5)
    approx = paged_attention_ref(q, k, v, meta, HEAD_DIM ** -0.5)
    error = (approx - exact).abs().max().item()
    assert 0 < error < bound


def test_int8_launch_takes_long_tiles_where_splits_hold_enough_of_them(monkeypatch) -> None:
    import kernels.attention.config as config

    monkeypatch.setattr(config, "num_sms", lambda device: 132)
    cuda = torch.device("cuda", 0)
    long, short = config.INT8_DECODE_TILES[:2]
    chosen = {b: config.int8_launch(b * 8, 8192, cuda) for b in (1, 8, 16, 32, 64)}
    # B >= 8: 512 programs, two waves of two an SM, 128-key tiles; B = 1: 32 splits of 256 tokens (two
    # 128-key tiles each, too few) take 64-key tiles
    assert chosen == {1: (32, short), 8: (8, long), 16: (4, long), 32: (2, long), 64: (1, long)}
    assert config.choose_num_splits(16, 8, 8192, cuda, kv_bits=8) == 4
    assert config.int8_launch(16 * 8, 8192, cuda, 3) == (3, long)  # asked splits: tiles by their length
    assert config.int8_launch(8, 512, cuda) == (8, short)  # 64 tokens a split, as the float caches
