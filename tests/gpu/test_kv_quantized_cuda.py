"""Compiled Triton KV store and attention over int8 / int4 caches at Llama-3-8B shapes, against the torch
references (GPU division may round a code the other way at a tie: codes within one step, outputs within the
interpreter-tested bounds)."""
from __future__ import annotations

import functools
import os
from typing import Any

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from bench.kernels.kernels_gpu import paged_batch
from contracts.kv_cache_spec import KVCacheSpec, scales_for
from engine.kv_cache import KVCache, with_key_offsets
from kernels.attention.config import (
    INT4_DEQUANT_MODES,
    INT4_QUADS,
    INT8_CAST,
    INT8_DECODE_MODES,
    INT8_DECODE_TILES,
    INT8_PAIR_LAUNCHES,
    INT8_PAIRS,
)
from kernels.attention.kernel import paged_attention_triton, paged_decode_attention
from kernels.attention.metadata import AttentionMetadata
from kernels.attention.reference import paged_attention_ref
from kernels.store_kv.kernel import store_kv_triton
from kernels.store_kv.reference import store_kv_ref
from tests.gpu.test_kernels_cuda import BLOCK, DEV, HEAD_DIM, HEADS, KV_HEADS

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]


@pytest.fixture(autouse=True)
def compiled_kernels_only() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter mode is on in this process: run tests/gpu in its own pytest process")


def cache(dtype: str, num_blocks: int, key_offsets: torch.Tensor | None = None) -> KVCache:
    spec = KVCacheSpec(BLOCK, KV_HEADS, HEAD_DIM, dtype, scales_for(dtype, HEAD_DIM))
    return KVCache(with_key_offsets(spec, key_offsets), 1, num_blocks, DEV, key_offsets)


def stored_batch(dtype: str, seqs, seed: int) -> tuple[torch.Tensor, KVCache, AttentionMetadata]:
    """paged_batch's queries and metadata, its K/V written into a `dtype` cache by the reference store."""
    q, k_float, v_float, meta = paged_batch(seqs, seed=seed)
    kv = cache(dtype, k_float.shape[0])
    store_kv_ref(k_float.view(-1, KV_HEADS, HEAD_DIM), v_float.view(-1, KV_HEADS, HEAD_DIM), *kv.layer(0),
                 torch.arange(k_float.shape[0] * BLOCK, device=DEV))
    return q, kv, meta


def assert_decode_matches_the_reference(dtype: str, seed: int, **options: Any) -> None:
    """The decode kernel with these options (tiles, int8_mode, int4_dequant), unsplit and in 5
    splits, over long and short contexts of a `dtype` cache, against the reference attention."""
    q, kv, meta = stored_batch(dtype, [(4095, 1)] * 2 + [(700, 1)] * 6 + [(1, 1)], seed)
    scale = HEAD_DIM ** -0.5
    expected = paged_attention_ref(q, *kv.layer(0), meta, scale)
    for splits in (1, 5):
        got = paged_decode_attention(q, *kv.layer(0), meta, scale, splits, **options)
        torch.testing.assert_close(got.float(), expected.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("dtype", ["int8", "int4", "int4+offset"])
def test_triton_store_writes_what_the_reference_writes_within_one_code(dtype: str) -> None:
    tokens = 100
    k, v = (torch.randn(tokens, KV_HEADS, HEAD_DIM, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    slots = torch.randperm(16 * BLOCK, device=DEV)[:tokens]
    # int4+offset: keys with a shared mean per head, stored minus a calibrated offset (QuantizedKV.offset).
    offsets = None
    if dtype == "int4+offset":
        dtype, offsets = "int4", (2 * torch.randn(1, KV_HEADS, HEAD_DIM, device=DEV)).half().float()
        k = (k.float() + offsets[0]).bfloat16()
    ref, tri = cache(dtype, 16, offsets), cache(dtype, 16, offsets)
    store_kv_ref(k, v, *ref.layer(0), slots)
    store_kv_triton(k, v, *tri.layer(0), slots)
    def codes(t: torch.Tensor) -> torch.Tensor:
        return t.int() if dtype == "int8" else torch.stack((t & 0xF, t >> 4), -1).int()

    for a, b in zip((ref.k[0], ref.v[0]), (tri.k[0], tri.v[0]), strict=True):
        diff = (codes(a) - codes(b)).abs()
        assert diff.max() <= 1 and diff.float().mean() < 0.01  # a rounding tie gone the other way, rarely
    # int8: a float16 ulp at most. int4 refits scale and zero to the codes (quant.INT4_REFIT_STEPS): a code
    # flipped at a tie moves its group's later fits by up to ~1 / group_size.
    atol, rtol = (1e-4, 2e-3) if dtype == "int8" else (2e-3, 5e-2)
    for a, b in zip(ref.layer_scales(0), tri.layer_scales(0), strict=True):
        torch.testing.assert_close(b.float(), a.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize("seqs", [[(4095, 1)] * 2 + [(700, 1)] * 6, [(0, 300), (1000, 1), (64, 64)]])
def test_triton_attention_over_quantized_blocks_matches_the_reference(dtype: str, seqs) -> None:
    q, kv, meta = stored_batch(dtype, seqs, seed=3)
    scale = HEAD_DIM ** -0.5
    expected = paged_attention_ref(q, *kv.layer(0), meta, scale)
    got = paged_attention_triton(q, *kv.layer(0), meta, scale)
    torch.testing.assert_close(got.float(), expected.float(), atol=3e-2, rtol=3e-2)
    assert q.shape[1] == HEADS


@pytest.mark.parametrize("mode", [m for m in INT8_DECODE_MODES if m != INT8_PAIRS])
@pytest.mark.parametrize("tiles", [t for t in INT8_DECODE_TILES if t])
def test_int8_decode_under_every_swept_tile_matches_the_reference(tiles: tuple[int, int, int],
                                                                  mode: int) -> None:
    assert_decode_matches_the_reference("int8", seed=4, tiles=tiles, int8_mode=mode)


@pytest.mark.parametrize("tiles", sorted({t for t, _, _ in INT8_PAIR_LAUNCHES} | {(64, 4, 3), (128, 8, 3)}))
def test_int8_pairs_decode_under_its_launch_tiles_matches_the_reference(tiles: tuple[int, int, int]) -> None:
    assert_decode_matches_the_reference("int8", seed=4, tiles=tiles, int8_mode=INT8_PAIRS)


def test_int8_pairs_ptx_equals_its_plain_shifts(monkeypatch) -> None:
    # the inline-PTX byte permutes and the interpreter's shifts build the same floats: equal outputs, and
    # within the split-K kernel's distance of the reference
    import kernels.attention.kernel as attention
    from kernels.attention.int8_decode import launch_int8_pairs

    q, kv, meta = stored_batch("int8", [(4095, 1)] * 2 + [(700, 1)] * 2 + [(3, 1)], seed=6)
    scale = HEAD_DIM ** -0.5
    outputs = []
    for ptx in (True, False):
        monkeypatch.setattr(attention, "launch_int8_pairs", functools.partial(launch_int8_pairs, ptx=ptx))
        outputs.append(paged_decode_attention(q, *kv.layer(0), meta, scale, 3, int8_mode=INT8_PAIRS))
    assert torch.equal(outputs[0], outputs[1])
    expected = paged_attention_ref(q, *kv.layer(0), meta, scale).float()
    baseline = paged_decode_attention(q, *kv.layer(0), meta, scale, 3, int8_mode=INT8_CAST).float()
    assert (outputs[0].float() - expected).abs().max() <= 2 * (baseline - expected).abs().max() + 1e-3


@pytest.mark.parametrize("mode", INT4_DEQUANT_MODES)  # the quad kernel (the launch's) and both dequantizing
def test_int4_decode_under_every_dequant_mode_matches_the_reference(mode: int) -> None:
    assert_decode_matches_the_reference("int4", seed=5, int4_dequant=mode)


def test_int4_quad_decode_ptx_equals_its_plain_bit_operations(monkeypatch) -> None:
    # the inline-PTX nibble conversion and the interpreter's integer ops build the same floats: equal outputs
    import kernels.attention.kernel as attention
    from kernels.attention.int4_decode import launch_int4_quads

    q, kv, meta = stored_batch("int4", [(4095, 1)] * 2 + [(700, 1)] * 2, seed=6)
    scale = HEAD_DIM ** -0.5
    outputs = []
    for ptx in (True, False):
        monkeypatch.setattr(attention, "launch_int4_quads", functools.partial(launch_int4_quads, ptx=ptx))
        outputs.append(paged_decode_attention(q, *kv.layer(0), meta, scale, 3, int4_dequant=INT4_QUADS))
    assert torch.equal(outputs[0], outputs[1])
