"""Engine-side int4 key offsets: calibrated deterministically at start (the mean key per layer and kv head
over fixed ids), named by the cache spec and the wire spec, and absent for every other cache dtype."""
from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig
from engine.kv_cache import key_offset_digest
from engine.llm_engine import LLMEngine
from engine.quantize.kv_balance import key_statistics
from engine.quantize.kv_offsets import KEY_OFFSET_TOKENS, calibration_ids, key_offsets
from engine.sequence_forward import prefill_cache

pytestmark = pytest.mark.timeout(120)


def engine(kv_cache_dtype: str) -> LLMEngine:
    return LLMEngine(EngineConfig(model_path="random:tiny", kv_cache_dtype=kv_cache_dtype, num_kv_blocks=16,
                                  num_threads=1))


def test_offsets_are_the_mean_key_of_each_layer_and_head_over_the_calibration_windows() -> None:
    model = engine("float32").model
    ids = calibration_ids("random:tiny", model.config.vocab_size)
    assert len(ids) == KEY_OFFSET_TOKENS and ids == calibration_ids("random:tiny", model.config.vocab_size)
    ids = ids[:700]  # a whole window of 512, then a partial one
    stats = key_statistics(model, ids)
    assert stats.count == len(ids)
    offsets = key_offsets(stats.k_sums / stats.count, torch.device("cpu"))
    keys = []
    for window in (ids[:512], ids[512:]):
        _, kv = prefill_cache(model, window, "float32")
        keys.append(torch.stack([k.flatten(0, 1)[:len(window)] for k in kv.k]))
    mean = torch.cat(keys, dim=1).double().mean(1)
    torch.testing.assert_close(offsets.double(), mean, atol=2e-3 * mean.abs().max().item(), rtol=1e-3)
    assert torch.equal(offsets, offsets.half().float())  # float16 values: every worker rounds the same way


def test_int4_engines_hold_the_same_offsets_and_name_them_in_both_specs() -> None:
    first, second = engine("int4"), engine("int4")
    digest = first.kv_cache.spec.key_offset_digest
    assert digest and digest == second.kv_cache.spec.key_offset_digest
    assert first.wire_kv_spec.key_offset_digest == digest
    assert key_offset_digest(first.kv_cache.key_offsets) == digest
    k_cache, v_cache = first.kv_cache.layer(0)
    assert torch.equal(k_cache.offset, first.kv_cache.key_offsets[0]) and v_cache.offset is None
    for dtype in ("float32", "int8"):
        other = engine(dtype)
        assert other.kv_cache.key_offsets is None and other.wire_kv_spec.key_offset_digest == ""
