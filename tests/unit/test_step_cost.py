"""Split-fused steps under a time credit: step costs, what the credit buys, the scheduler (no model)."""
from __future__ import annotations

import pytest

from contracts.sampling import SamplingParams
from engine.block_manager import BlockManager
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import Sequence
from engine.step_cost import StepCostModel

pytestmark = pytest.mark.timeout(60)

# A CPU-like box (the shape measured in docs/benchmarks.md): a batch of one decodes on a flat path (34 ms);
# other steps run eager: 20 ms + 20 ms per decode, and a prefill chunk adds 16 ms + 2.7 ms a token, so one
# prefill token beside a batch of one costs 1.7x its pure step and no per-step cap can hold 1.5x.
FLAT, FIXED, PER_DECODE, PREFILL_FIXED, PER_PREFILL = 0.034, 0.020, 0.020, 0.016, 0.0027


def cost(decodes: int, prefill: int) -> float:
    if decodes == 1 and prefill == 0:
        return FLAT
    return FIXED + PER_DECODE * decodes + (PREFILL_FIXED + PER_PREFILL * prefill if prefill else 0.0)


def run(model: StepCostModel, decodes: int, pending: int, steps: int) -> list[tuple[int, float]]:
    """Steps of a fixed decode batch beside prompts needing `pending` tokens: (prefill tokens, seconds)."""
    trace = []
    for _ in range(steps):
        p = min(model.prefill_cap(decodes, pending), pending, 512)
        seconds = cost(decodes, p)
        model.observe(decodes, p, seconds)
        pending -= p
        trace.append((p, seconds))
    return trace


def test_pure_steps_are_timed_per_batch_size_and_an_unseen_size_takes_the_nearest_smaller():
    model = StepCostModel(1.5)
    assert model.pure(1) is None
    for d in (1, 4):
        model.observe(d, 0, cost(d, 0))
    assert (model.pure(1), model.pure(4)) == (FLAT, cost(4, 0))
    assert (model.pure(3), model.pure(9)) == (FLAT, cost(4, 0))


def test_a_first_fused_step_far_beyond_the_debt_bound_is_paid_for_but_not_fitted():
    model = StepCostModel(1.5)
    model.observe(1, 0, FLAT)
    model.observe(1, 1, FLAT + 0.6)  # a one-off: the CPU packs its weights at the first multi-row step
    assert model.extra() is None and model.credit < 0
    model.observe(1, 4, cost(1, 4))
    assert model.extra() == (0.0, pytest.approx((cost(1, 4) - FLAT) / 4))
    model.observe(1, 1, FLAT + 0.6)  # no longer the first: fitted
    assert model.extra()[1] > 0.1


def test_the_fit_recovers_a_fused_steps_fixed_and_per_token_cost_beyond_the_pure_step():
    model = StepCostModel(1.5)
    model.observe(2, 0, cost(2, 0))
    for p in (1, 8, 30, 64, 5):
        model.observe(2, p, cost(2, p))
    e0, c = model.extra()
    assert e0 == pytest.approx(PREFILL_FIXED, rel=1e-6) and c == pytest.approx(PER_PREFILL, rel=1e-6)
    model = StepCostModel(1.5)
    model.observe(1, 0, FLAT)
    for p in (1, 16, 4):
        model.observe(1, p, cost(1, p))
    e0, c = model.extra()
    assert e0 == pytest.approx(FIXED + PER_DECODE + PREFILL_FIXED - FLAT, rel=1e-6)  # off the flat path
    assert c == pytest.approx(PER_PREFILL, rel=1e-6)


@pytest.mark.parametrize("decodes", [1, 2, 8])
def test_beside_a_long_prompt_the_mean_step_stays_within_the_slowdown_and_the_prompt_progresses(decodes):
    model = StepCostModel(1.5)
    trace = run(model, decodes, pending=100_000, steps=400)
    steady = trace[40:]  # after the first fused steps taught it their cost
    mean = sum(t for _, t in steady) / len(steady)
    assert mean <= 1.5 * cost(decodes, 0) * 1.02
    prefilled = sum(p for p, _ in steady) / len(steady)
    # The fixed cost of leaving the decode path is paid once a window: several tokens a step on average.
    assert prefilled > 2
    # One prefill token in every step (a per-step cap's floor) would cost more than 1.5x at a batch of one.
    if decodes == 1:
        assert cost(1, 1) > 1.5 * cost(1, 0)


def test_a_prompt_that_fits_the_credit_starts_at_once_and_one_that_does_not_waits_for_a_full_credit():
    model = StepCostModel(1.5)
    assert model.prefill_cap(2, 16) == 0  # no decode-only step timed yet: nothing to compare with
    run(model, 2, pending=0, steps=10)  # credit full: 4 x 0.5 x 60 ms
    assert model.prefill_cap(2, 100_000) == 1  # no fused step timed yet: one token, to learn its cost
    for _ in range(2):  # two fused steps of different sizes teach the model their cost
        run(model, 2, pending=100_000, steps=1)
        run(model, 2, pending=0, steps=10)
    assert model.extra() == pytest.approx((PREFILL_FIXED, PER_PREFILL), rel=1e-6)
    assert model.prefill_cap(2, 8) == 8  # fits: starts now, whole
    cap = model.prefill_cap(2, 100_000)  # a chunk the credit pays for, fixed cost included
    assert cap > 1 and PREFILL_FIXED + PER_PREFILL * cap <= model.credit
    run(model, 2, pending=100_000, steps=1)  # spent (prefill_cap only reads: this step took `cap`)
    assert model.prefill_cap(2, 100_000) == 0 and model.prefill_cap(2, 2) == 2


def test_the_credit_follows_a_box_whose_cost_changed():
    model = StepCostModel(1.5)
    run(model, 4, pending=100_000, steps=100)
    global PER_PREFILL
    old, PER_PREFILL = PER_PREFILL, 4 * PER_PREFILL  # prefill tokens became 4x dearer (other jobs)
    try:
        steady = run(model, 4, pending=100_000, steps=400)[100:]
        assert sum(t for _, t in steady) / len(steady) <= 1.5 * cost(4, 0) * 1.02
        assert sum(p for p, _ in steady) > 0  # fewer tokens a window, still progressing
        # Chunks of one size since: the fit predicts that size's cost (the credit pays what steps measured).
        chunk = max(p for p, _ in steady[-20:])
        e0, c = model.extra()
        assert e0 + c * chunk == pytest.approx(cost(4, chunk) - cost(4, 0), rel=0.1)
    finally:
        PER_PREFILL = old


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


def taught(decodes: int) -> StepCostModel:
    """A model that has timed this box's pure and fused steps, with its credit spent."""
    model = StepCostModel(1.5)
    run(model, decodes, pending=100_000, steps=40)
    model.credit = 0.0
    return model


@pytest.mark.parametrize("decodes", [1, 2, 8])
def test_the_fused_prefill_pace_it_reports_is_the_pace_the_credit_keeps(decodes):
    model = StepCostModel(1.35)
    assert model.fused_prefill_s_per_token(decodes) is None  # nothing timed yet
    trace = run(model, decodes, pending=100_000, steps=600)
    steady = trace[100:]
    measured = sum(t for _, t in steady) / sum(p for p, _ in steady)  # wall seconds per prompt token
    assert model.fused_prefill_s_per_token(decodes) == pytest.approx(measured, rel=0.05)
    assert measured > 3 * PER_PREFILL  # far slower than the same tokens in a prefill-only step


def test_prefill_only_steps_teach_the_pace_of_a_prompt_on_an_idle_worker():
    model = StepCostModel(1.5)
    assert model.prefill_only_s_per_token == 0.0
    model.observe(0, 400, 400 * 0.0045)
    model.observe(0, 200, 200 * 0.0050)
    assert model.prefill_only_s_per_token == pytest.approx(0.0045 + 0.2 * 0.0005)
    assert model.pure_seconds == {} and model.credit == 0.0  # and nothing earned or paid


def test_beside_decodes_the_scheduler_prefills_only_what_the_credit_buys():
    sched = make(1.5)
    for i in range(4):
        sched.add(seq(f"d{i}", 8))
    sched.step_cost = taught(4)
    assert step(sched) == {f"d{i}": 8 for i in range(4)}  # no decodes yet: prompts take the budget
    sched.add(seq("long", 3000))
    sched.step_cost = model = taught(4)
    model.finish = lambda *a: None  # the steps run here take microseconds: feed the box's costs instead
    decodes = {"d0": 1, "d1": 1, "d2": 1, "d3": 1}
    chunks = []
    for _ in range(12):
        cap = model.prefill_cap(4, 3000 - sum(chunks))
        got = step(sched)
        chunks.append(got.pop("long", 0))
        assert got == decodes and chunks[-1] == min(cap, 128)  # the fair-prefill threshold caps it too
        model.observe(4, chunks[-1], cost(4, chunks[-1]))
    assert chunks.count(0) >= 6 and 0 < max(chunks) <= 128  # banked, then spent in one chunk


def test_without_decodes_a_prompt_is_not_capped_by_the_cost_model():
    sched = make(1.5)
    sched.step_cost = taught(4)
    sched.add(seq("long", 3000))
    assert step(sched) == {"long": 512}


def test_the_scheduler_times_its_own_steps_into_the_model():
    sched = make(1.5)
    sched.add(seq("a", 40))
    step(sched)
    step(sched)
    assert list(sched.step_cost.pure_seconds) == [1]  # the prefill-only step earns nothing


def test_off_means_no_model_and_a_bad_slowdown_is_refused():
    assert make(0).step_cost is None
    with pytest.raises(ValueError, match="fused_step_max_slowdown"):
        make(1.0)
