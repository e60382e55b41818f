"""The fused bs1 step over int8 / int4 KV caches (kernels/cpu_quant/kv_quant.c) against FlatDecoder's torch
ops path, which stores through kernels/store_kv/quant.py and reads the blocks dequantized."""
from __future__ import annotations

import pytest
import torch

from contracts.kv_cache_spec import KVCacheSpec, scales_for
from engine.kv_cache import KVCache, with_key_offsets
from engine.model import LlamaModel
from kernels.cpu_quant.kv_rows import KVRows
from kernels.cpu_quant.library import BASE_FLAGS, library
from kernels.cpu_quant.step import supports_kv
from kernels.store_kv.quant import QuantizedKV
from tests.kernels.cpu_quant.test_cpu_quant_step import PROMPT, tiny_model
from tests.kernels.cpu_quant.test_cpu_quant_step import decode as decode_over
from tests.quantized_rows import assert_same_rows

pytestmark = pytest.mark.timeout(120)


def quantized_cache(model: LlamaModel, dtype: str) -> KVCache:
    c = model.config
    offsets = None
    if dtype == "int4":  # key offsets as an int4 engine calibrates them (any values: readers ignore them)
        gen = torch.Generator().manual_seed(3)
        offsets = torch.randn(c.num_layers, c.num_kv_heads, c.head_dim, generator=gen).half().float()
    spec = KVCacheSpec(4, c.num_kv_heads, c.head_dim, dtype, scales_for(dtype, c.head_dim))
    return KVCache(with_key_offsets(spec, offsets), c.num_layers, 8, key_offsets=offsets)


def decode(model: LlamaModel, dtype: str, blocks: list[int], fused: bool,
           lib=None) -> tuple[torch.Tensor, KVCache]:
    """test_cpu_quant_step's decode over a fresh `dtype` cache."""
    return decode_over(model, blocks, fused, lib, quantized_cache(model, dtype))


@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize("weights", ["w4a16", "w8"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("blocks", [[2, 3, 4], [5, 0, 3]])
def test_fused_step_over_a_quantized_cache_matches_the_torch_ops_path(dtype: str, weights: str, threads: int,
                                                                      blocks: list[int]) -> None:
    torch.set_num_threads(threads)
    model = tiny_model(weights)
    fused, fused_kv = decode(model, dtype, blocks, fused=True)
    plain, plain_kv = decode(model, dtype, blocks, fused=False)
    torch.testing.assert_close(fused, plain, atol=1e-4, rtol=1e-4)
    for layer in range(model.config.num_layers):
        for a, b in zip(fused_kv.layer(layer), plain_kv.layer(layer), strict=True):
            assert_same_rows(a, b, blocks)


def test_the_prompt_rows_stay_as_the_torch_path_stored_them() -> None:
    """The step stores its own token only: positions before it keep the prompt's bytes."""
    model = tiny_model("w4a16")
    _, fused_kv = decode(model, "int4", [2, 3, 4], fused=True)
    _, plain_kv = decode(model, "int4", [2, 3, 4], fused=False)
    prompt_slots = 2 * 4 + torch.arange(len(PROMPT))  # block 2 onwards, in order
    for a, b in zip(fused_kv.k + fused_kv.v, plain_kv.k + plain_kv.v, strict=True):
        assert torch.equal(a.view(-1, *a.shape[2:])[prompt_slots], b.view(-1, *b.shape[2:])[prompt_slots])


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_fused_step_over_a_quantized_cache_is_bit_identical_across_threads_and_in_the_scalar_build(
        dtype: str) -> None:
    model = tiny_model("w4a16")
    outs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        outs.append(decode(model, dtype, [5, 0, 3], fused=True)[0])
    assert torch.equal(outs[0], outs[1])
    torch.set_num_threads(1)
    scalar, _ = decode(model, dtype, [5, 0, 3], fused=True, lib=library(BASE_FLAGS))
    torch.testing.assert_close(scalar, outs[0], atol=1e-4, rtol=1e-4)


def test_caches_the_c_store_cannot_take_are_refused_by_name() -> None:
    model = tiny_model("w4a16")
    kv = quantized_cache(model, "int4")
    k_cache, _ = kv.layer(0)
    assert supports_kv(k_cache)
    # head_dim past the C row buffers, bfloat16 scales, a non-contiguous codes view: not the step's
    half = torch.float16
    wide = QuantizedKV(torch.zeros(2, 4, 1, 256, dtype=torch.uint8), torch.zeros(2, 4, 1, 16, dtype=half),
                       torch.zeros(2, 4, 1, 16, dtype=half), 32, True)
    assert not supports_kv(wide)
    with pytest.raises(ValueError, match="supports_kv"):
        KVRows([(wide, wide)], num_heads=2)
    assert not supports_kv(QuantizedKV(torch.zeros(2, 4, 1, 16, dtype=torch.int8),
                                       torch.zeros(2, 4, 1, dtype=torch.bfloat16)))
    assert not supports_kv(QuantizedKV(torch.zeros(2, 4, 1, 32, dtype=torch.int8)[..., ::2],
                                       torch.zeros(2, 4, 1, dtype=torch.float16)))
