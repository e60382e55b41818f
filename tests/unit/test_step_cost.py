"""Split-fused steps under a step cost model: the fit, its prefill cap, the scheduler using it (no model)."""
from __future__ import annotations

import pytest

from contracts.sampling import SamplingParams
from engine.block_manager import BlockManager
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import Sequence
from engine.step_cost import StepCostModel

pytestmark = pytest.mark.timeout(60)

# A box where a step costs 40 ms fixed, 0.5 ms per decode token and 2 ms per prefill token.
FIXED, PER_DECODE, PER_PREFILL = 0.040, 0.0005, 0.002


def cost(decodes: int, prefill: int) -> float:
    return FIXED + PER_DECODE * decodes + PER_PREFILL * prefill


def fitted(max_slowdown: float = 1.5) -> StepCostModel:
    model = StepCostModel(max_slowdown)
    for step in range(40):  # batches of 1..8 decodes, every other step with a prefill chunk of 0..96
        decodes, prefill = 1 + step % 8, (step % 4) * 32 if step % 2 else 0
        model.observe(decodes, prefill, cost(decodes, prefill))
    return model


def test_the_fit_recovers_the_step_cost_from_mixed_steps():
    fixed, per_decode, per_prefill = fitted().coefficients
    assert fixed == pytest.approx(FIXED, rel=1e-6)
    assert per_decode == pytest.approx(PER_DECODE, rel=1e-6)
    assert per_prefill == pytest.approx(PER_PREFILL, rel=1e-6)


@pytest.mark.parametrize("decodes", [1, 4, 16, 64])
def test_a_step_within_the_cap_costs_at_most_the_allowed_slowdown_and_one_token_more_would_not(decodes):
    cap = fitted(1.5).prefill_cap(decodes)
    assert cost(decodes, cap) <= 1.5 * cost(decodes, 0) < cost(decodes, cap + 1)


def test_no_cap_until_steps_with_and_without_prefill_were_seen():
    model = StepCostModel(1.5)
    for _ in range(20):
        model.observe(4, 0, cost(4, 0))
    assert model.prefill_cap(4) is None  # a prefill token's cost is unknown
    for _ in range(4):
        model.observe(4, 64, cost(4, 64))
    # One batch size throughout: the fixed cost absorbs the decodes'.
    assert model.prefill_cap(4) == int(0.5 * cost(4, 0) / PER_PREFILL)


def test_the_cap_is_at_least_one_token_so_a_prompt_always_progresses():
    model = StepCostModel(1.01)
    for step in range(20):
        model.observe(2, 64 if step % 2 else 0, cost(2, 64 if step % 2 else 0))
    assert model.prefill_cap(2) == 1


def test_the_fit_follows_a_box_whose_cost_changed():
    model = fitted()
    for step in range(2000):  # prefill tokens became 4x dearer (e.g. other jobs took the cores)
        decodes, prefill = 1 + step % 8, (step % 4) * 32 if step % 2 else 0
        model.observe(decodes, prefill, FIXED + PER_DECODE * decodes + 4 * PER_PREFILL * prefill)
    assert model.coefficients[2] == pytest.approx(4 * PER_PREFILL, rel=1e-3)


def make(slowdown: float = 1.5) -> Scheduler:
    config = SchedulerConfig(max_batch_tokens=512, max_num_seqs=8, block_size=16, max_model_len=8192,
                             long_prefill_token_threshold=128, fused_step_max_slowdown=slowdown)
    return Scheduler(config, BlockManager(600, 16))


def seq(rid: str, n: int, max_tokens: int = 100) -> Sequence:
    tokens = [10 + i % 90 for i in range(n)]
    return Sequence(rid, tokens, SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def step(sched: Scheduler) -> dict[str, int]:
    out = sched.schedule()
    sched.postprocess(out, {c.seq.request_id: (7,) * c.num_sampled for c in out.chunks if c.num_sampled})
    return {c.seq.request_id: c.num_new_tokens for c in out.chunks}


def test_beside_decodes_the_scheduler_prefills_only_what_the_cost_model_allows():
    sched = make(1.5)
    sched.step_cost = fitted(1.5)
    for i in range(4):
        sched.add(seq(f"d{i}", 8))
    assert step(sched) == {f"d{i}": 8 for i in range(4)}  # no decodes yet: prompts take the budget
    sched.add(seq("long", 3000))
    for _ in range(3):
        cap = sched.step_cost.prefill_cap(4)  # the steps run here (microseconds) are fitted in too
        assert 0 < cap < 128  # below the fair-prefill threshold: the cost model is what limits the chunk
        assert step(sched) == {"d0": 1, "d1": 1, "d2": 1, "d3": 1, "long": cap}


def test_without_decodes_a_prompt_is_not_capped_by_the_cost_model():
    sched = make(1.5)
    sched.step_cost = fitted(1.5)
    sched.add(seq("long", 3000))
    assert step(sched) == {"long": 512}


def test_the_scheduler_times_its_own_steps_into_the_model():
    sched = make(1.5)
    sched.add(seq("a", 40))
    step(sched)
    step(sched)
    assert (sched.step_cost._steps_with_prefill, sched.step_cost._steps_without) == (1, 1)


def test_off_means_no_model_and_a_bad_slowdown_is_refused():
    assert make(0).step_cost is None
    with pytest.raises(ValueError, match="fused_step_max_slowdown"):
        make(1.0)
