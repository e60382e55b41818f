"""The tiny random model gives the same greedy tokens with the prefix cache on and off, and skips work."""
from __future__ import annotations

import dataclasses

import pytest

from contracts.sampling import SamplingParams
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine

pytestmark = pytest.mark.timeout(120)

CONFIG = EngineConfig(model_path="random:tiny", device="cpu", block_size=4, num_kv_blocks=64,
                      max_batch_tokens=16)
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
SYSTEM = list(range(3, 22))  # 19 shared tokens: 4 full blocks
PROMPTS = [SYSTEM + [30 + i, 40 + i, 50 + i] for i in range(3)] + [SYSTEM[:9]]


def outputs(prefix_caching: bool) -> tuple[list[list[int]], LLMEngine]:
    engine = LLMEngine(dataclasses.replace(CONFIG, prefix_caching=prefix_caching))
    first = engine.generate(PROMPTS[:1], GREEDY)  # fills the cache, then the rest reuse it
    return first + engine.generate(PROMPTS[1:], GREEDY), engine


def test_greedy_output_is_identical_with_the_cache_on_and_off():
    off, engine_off = outputs(False)
    on, engine_on = outputs(True)
    assert on == off
    stats = engine_on.stats()
    # Prompts 2 and 3 reuse 4 blocks each; the 9-token one reuses 2 (its last token stays private).
    assert stats.prefix_hit_tokens == 16 + 16 + 8
    assert engine_off.stats().prefix_query_tokens == 0
    assert stats.num_free_blocks == CONFIG.num_kv_blocks
    engine_on.block_manager.check_invariants()
