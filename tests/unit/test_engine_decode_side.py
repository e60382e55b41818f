"""LLMEngine's decode-side calls (reserve → activate, abort) on the tiny random model: exact block counts."""
from __future__ import annotations

import pytest

from contracts.sampling import SamplingParams
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.scheduler import SchedulerError

CONFIG = EngineConfig(model_path="random:tiny", device="cpu", block_size=4, num_kv_blocks=8)
SAMPLING = SamplingParams(max_tokens=3, ignore_eos=True)


@pytest.fixture()
def engine() -> LLMEngine:
    return LLMEngine(CONFIG)


def test_reserve_holds_blocks_for_the_prompt_and_schedules_nothing_until_activate(engine: LLMEngine) -> None:
    block_ids = engine.reserve("r", list(range(1, 11)), SAMPLING)  # 10 tokens: 3 blocks of 4
    assert block_ids is not None and len(set(block_ids)) == 3
    assert engine.stats().num_free_blocks == 8 - 3
    assert not engine.has_work()  # its KV has not arrived: nothing to compute

    seq = engine.activate("r", first_token_id=7)
    assert seq.output_token_ids == [7] and seq.num_computed_tokens == 10
    while engine.has_work():
        engine.step()
    assert len(seq.output_token_ids) == 3
    assert engine.stats().num_free_blocks == 8


def test_reserve_without_room_holds_nothing(engine: LLMEngine) -> None:
    assert engine.reserve("big", list(range(1, 30)), SAMPLING) is not None  # 29 tokens: 8 blocks
    assert engine.reserve("more", [1, 2], SAMPLING) is None
    assert engine.stats().num_free_blocks == 0
    assert not engine.abort("more")  # nothing was registered under that id


def test_abort_frees_a_reservation_exactly_once(engine: LLMEngine) -> None:
    engine.reserve("r", [1, 2, 3, 4, 5], SAMPLING)
    assert engine.abort("r")
    assert not engine.abort("r")
    assert engine.stats().num_free_blocks == 8
    with pytest.raises(SchedulerError):
        engine.activate("r", first_token_id=7)  # its KV arrived too late: nothing awaits it any more
