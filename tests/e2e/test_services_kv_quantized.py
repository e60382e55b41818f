"""Disaggregated == colocated per quantized cache dtype: prefill and decode services in one process joined by
a real gloo KV channel, the int8 / int4 cache (codes and scales) moving as stored."""
from __future__ import annotations

import asyncio

import pytest

from contracts.sampling import FinishReason, SamplingParams
from decode_worker.service import DecodeService
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from prefill_worker.service import PrefillService
from tests.e2e.test_services_inprocess import _disaggregated
from tests.service_pair import connect_services

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PROMPTS = [[1, 50, 34, 28, 46, 31], list(range(100, 170))]


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "int4"])
def test_disaggregated_matches_colocated_with_a_quantized_cache(kv_cache_dtype: str) -> None:
    # random:tiny (head_dim 16): the embedded model is too slow for two dtypes × two samplings here.
    config = EngineConfig(model_path="random:tiny", device="cpu", num_kv_blocks=32, max_batch_tokens=32,
                          kv_cache_dtype=kv_cache_dtype)
    decode = DecodeService("decode-0", config)
    prefill = PrefillService("prefill-0", config)
    try:
        connect_services(prefill, decode)
        assert decode.layout.dtype == prefill.layout.dtype == kv_cache_dtype
        reference = LLMEngine(config)
        for sampling in (SamplingParams(max_tokens=12, ignore_eos=True),
                         SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.8, top_k=40, seed=7)):
            expected = reference.generate(PROMPTS, sampling)
            for i, prompt in enumerate(PROMPTS):
                rid = f"{kv_cache_dtype}-{i}-{sampling.seed}"
                got, reason = asyncio.run(_disaggregated(prefill, decode, rid, prompt, sampling))
                assert got == expected[i]
                assert reason is FinishReason.LENGTH
    finally:
        prefill.shutdown()
        decode.shutdown()
