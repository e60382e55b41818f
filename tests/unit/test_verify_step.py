"""A step with verify positions on the tiny random model equals single steps, token for token."""
from __future__ import annotations

import pytest

from contracts.sampling import SamplingParams
from engine.llm_engine import LLMEngine
from tests.tiny_model import tiny_preset_engine

pytestmark = pytest.mark.timeout(120)

PROMPT = [5, 17, 300, 42, 9, 77, 128]


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return tiny_preset_engine()


@pytest.mark.parametrize("sampling", [
    SamplingParams(max_tokens=10, ignore_eos=True),
    SamplingParams(max_tokens=10, ignore_eos=True, temperature=0.9, seed=11),  # draws seeded per position
], ids=["greedy", "seeded"])
def test_verify_steps_give_the_tokens_of_single_steps(engine: LLMEngine, sampling: SamplingParams) -> None:
    (reference,) = engine.generate([PROMPT], sampling)
    seq = engine.add_request(f"verify-{sampling.temperature}", PROMPT, sampling)
    engine.step()  # prefill and the first token
    assert seq.output_token_ids == reference[:1]

    seq.draft_token_ids = reference[1:5]  # all four right: five tokens come out of one step
    batch = engine.schedule()
    assert [(c.num_new_tokens, c.num_sampled) for c in batch.chunks] == [(5, 5)]
    out = engine.execute(batch)
    assert out.sampled[seq.request_id] == tuple(reference[1:6])
    engine.postprocess(batch, out)
    assert seq.output_token_ids == reference[:6] and seq.num_computed_tokens == len(PROMPT) + 5

    wrong = (reference[7] + 1) % engine.model_config.vocab_size
    seq.draft_token_ids = [reference[6], wrong, 3]  # the second draft is rejected
    engine.step()
    assert seq.output_token_ids == reference[:8]
    assert seq.num_computed_tokens == len(PROMPT) + 7  # the rejected positions were rolled back
    assert len(seq.block_table) == engine.block_manager.blocks_needed(seq.num_tokens)

    while engine.has_work():  # rejected KV slots are rewritten by the next steps
        engine.step()
    assert seq.output_token_ids == reference
    assert engine.block_manager.num_free == engine.block_manager.num_total
