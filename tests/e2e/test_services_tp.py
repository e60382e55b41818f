"""Prefill and decode services of different TP sizes (2 ranks: one process + one follower each), joined by a
real gloo KV channel: KV moves as whole heads and greedy output equals TP=1 colocated."""
from __future__ import annotations

import asyncio
import dataclasses

import pytest

from contracts.sampling import FinishReason, SamplingParams
from decode_worker.service import DecodeService
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from prefill_worker.service import PrefillService
from tests.e2e.test_services_inprocess import _disaggregated
from tests.service_pair import connect_services

pytestmark = pytest.mark.timeout(300)

# The tiny random model (2 kv heads: one a rank at TP=2; tests/unit/test_tp_kv_shards.py covers uneven
# splits such as SmolLM2's 3 kv heads). max_batch_tokens=32: the long prompt takes two chunks.
CONFIG = EngineConfig(model_path="random:tiny", device="cpu", num_kv_blocks=32, max_batch_tokens=32,
                      num_threads=1)
PROMPTS = [[1, 504, 345, 282, 469, 314], list(range(100, 150))]
GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def expected() -> list[list[int]]:
    return LLMEngine(CONFIG).generate(PROMPTS, GREEDY)


@pytest.mark.parametrize(("prefill_tp", "decode_tp"), [(2, 1), (1, 2)])
def test_prefill_and_decode_of_different_tp_sizes_match_tp1_colocated(expected, prefill_tp, decode_tp):
    decode = DecodeService("decode-0", dataclasses.replace(CONFIG, tp_size=decode_tp))
    prefill = PrefillService("prefill-0", dataclasses.replace(CONFIG, tp_size=prefill_tp))
    followers = [p for s in (prefill, decode) if s.tp_ranks is not None for p in s.tp_ranks.followers]
    try:
        connect_services(prefill, decode)
        info = asyncio.run((prefill if prefill_tp > 1 else decode).info())
        assert [r.kv_heads for r in info.tp_ranks] == [(0,), (1,)]
        for i, prompt in enumerate(PROMPTS):
            got, reason = asyncio.run(_disaggregated(prefill, decode, f"r{i}", prompt, GREEDY))
            assert got == expected[i]
            assert reason is FinishReason.LENGTH
        assert decode.engine.stats().num_free_blocks == CONFIG.num_kv_blocks
    finally:
        prefill.shutdown()
        decode.shutdown()
    assert followers and all(p.exitcode == 0 for p in followers)
