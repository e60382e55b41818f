"""Every path that can write an int8 / int4 cache writes the same codes, scales and zeros: the torch store
(and the rotary / norm-qkv-rope references over it), the Triton store and the rotary + store kernel, and the
Triton norm-qkv-rope op (which leaves its float-only fused epilogues for quantized caches). Interpreted on
CPU, with the exact inputs of test_store_kv_paths."""
from __future__ import annotations

import pytest
import torch

from contracts.kv_cache_spec import KVCacheSpec, scales_for
from engine.kv_cache import KVCache
from kernels.store_kv.quant import dequantize_blocks
from kernels.store_kv.reference import store_kv_ref
from tests.kernels.store_kv.test_store_kv_paths import (
    BLOCK,
    BLOCKS,
    HEAD_DIM,
    KV_HEADS,
    SLOTS,
    stored,
    written_quantized_by_every_path,
)

pytestmark = pytest.mark.timeout(120)


def cache(dtype: str) -> KVCache:
    return KVCache(KVCacheSpec(BLOCK, KV_HEADS, HEAD_DIM, dtype, scales_for(dtype, HEAD_DIM)), 1, BLOCKS)


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_every_path_writes_the_same_quantized_bytes_and_scales(dtype: str) -> None:
    caches = written_quantized_by_every_path(lambda: cache(dtype))
    expected = stored(caches.pop("store_kv_ref"))
    assert expected[0].any()
    for name, kv in caches.items():
        for got, want in zip(stored(kv), expected, strict=True):
            assert torch.equal(got, want), f"{name} wrote other bytes"


@pytest.mark.parametrize("dtype, bound", [("int8", 1 / 254), ("int4", 1 / 15)])
def test_stored_rows_read_back_within_their_format_bound(dtype: str, bound: float) -> None:
    gen = torch.Generator().manual_seed(5)
    k, v = (torch.randn(len(SLOTS), KV_HEADS, HEAD_DIM, generator=gen) for _ in range(2))
    kv = cache(dtype)
    store_kv_ref(k, v, *kv.layer(0), SLOTS)
    for rows, operand in zip((k, v), kv.layer(0), strict=True):
        back = dequantize_blocks(operand, torch.arange(BLOCKS), torch.float32).view(-1, KV_HEADS, HEAD_DIM)
        # Per row, the error stays within half a step of its grid: range / 254 (int8), range / 30 (int4),
        # rotation included (orthonormal: it keeps a row's norm, and the bound holds on its max norm).
        assert ((back[SLOTS] - rows).abs().amax(-1) <= bound * rows.abs().amax(-1) * 2 + 1e-3).all()


def test_int4_refit_lowers_the_squared_error_of_the_min_max_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    from kernels.store_kv import quant

    rows = torch.randn(256, 64, generator=torch.Generator().manual_seed(7))

    def squared_error() -> torch.Tensor:
        codes, scale, zero = quant.quantize_int4(rows, 32)
        return ((quant.dequantize_int4(codes, scale, zero, torch.float32) - rows) ** 2).sum(-1)

    refitted = squared_error()
    monkeypatch.setattr(quant, "INT4_REFIT_STEPS", 0)
    min_max = squared_error()
    # Each step is a least-squares fit then nearest rounding: never worse per row (float16 rounding aside).
    assert (refitted <= min_max * 1.001 + 1e-6).all() and refitted.mean() < 0.9 * min_max.mean()
