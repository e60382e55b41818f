"""The sim's split-fused time credit is the engine's: the steps engine/scheduler.py makes on its costs."""
from __future__ import annotations

import pytest

from bench.serving.sim_costs import DecodeCost, PrefillCost, StepCosts, TransferCost
from bench.serving.sim_events import ClusterSpec, SimRequest, simulate
from contracts.sampling import SamplingParams
from engine.block_manager import BlockManager
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import Sequence

# A decode step of 20 ms + 5 ms a stream; prefill 1 ms a token (the marginal part beside decodes).
COSTS = StepCosts(PrefillCost(10.0, 1.0), DecodeCost(20.0, 5.0), TransferCost(1, 1, 1e9))
CREDIT = ClusterSpec("coloc", fused_max_slowdown=1.5)
# a streams 20 tokens; b's 400-token prompt and c's 30-token one arrive while it decodes.
REQUESTS = [SimRequest(0.0, 8, 20), SimRequest(0.2005, 400, 4), SimRequest(0.3003, 30, 3)]


def engine_times(costs: StepCosts, slowdown: float, requests: list[SimRequest]) -> list[tuple[float, float]]:
    """(first token, last token) seconds of each request when the engine's own scheduler, on a virtual clock,
    makes the steps and each step costs what the sim charges for it."""
    config = SchedulerConfig(max_batch_tokens=512, max_num_seqs=32, block_size=16, max_model_len=8192,
                             fused_step_max_slowdown=slowdown)
    sched = Scheduler(config, BlockManager(600, 16))
    model = sched.step_cost
    model.finish = lambda *a: None  # steps here take microseconds: the model is fed the charged cost instead
    arrivals = sorted(enumerate(requests), key=lambda ir: ir[1].arrival)
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    clock, done = 0.0, 0
    while done < len(requests):
        while arrivals and arrivals[0][1].arrival <= clock:
            i, r = arrivals.pop(0)
            params = SamplingParams(max_tokens=r.output, ignore_eos=True)
            sched.add(Sequence(str(i), [10 + k % 90 for k in range(r.prompt)], params))
        out = sched.schedule()
        if not out.chunks:
            clock = arrivals[0][1].arrival
            continue
        prefill = [(c.num_new_tokens, c.start) for c in out.chunks if c.start < c.seq.num_prompt_tokens]
        decodes = len(out.chunks) - len(prefill)
        ms = (costs.decode.step_ms(decodes, 0) + costs.prefill.marginal_ms(prefill) if decodes
              else costs.prefill.step_ms(prefill))
        if decodes:
            model.observe(decodes, sum(n for n, _ in prefill), ms / 1e3)
        clock += ms / 1e3
        sampled = {c.seq.request_id: (7,) for c in out.chunks if c.num_sampled}
        for rid in sampled:
            first.setdefault(rid, clock)
            last[rid] = clock
        done += len(sched.postprocess(out, sampled))
    return [(first[str(i)], last[str(i)]) for i in range(len(requests))]


def test_colocated_prefill_beside_decodes_takes_the_engine_schedulers_steps() -> None:
    records = simulate(CREDIT, COSTS, REQUESTS)
    for rec, (first, last) in zip(records, engine_times(COSTS, 1.5, REQUESTS), strict=True):
        assert rec.sent_at + rec.ttft == pytest.approx(first, abs=1e-9)
        assert rec.sent_at + rec.e2e == pytest.approx(last, abs=1e-9)


def test_the_credit_keeps_the_streams_mean_step_within_the_slowdown_while_prompts_progress() -> None:
    a, b, _ = simulate(CREDIT, COSTS, REQUESTS)
    free_a, free_b, _ = simulate(ClusterSpec("coloc"), COSTS, REQUESTS)
    pure = COSTS.decode.step_ms(1, 0) / 1e3
    # Uncapped, one of a's 19 steps carries b's whole prompt (+400 ms); under the credit a's steps average at
    # most 1.5x its decode-only step (25 ms alone, 30 ms beside c), give or take a window's credit (50 ms).
    assert free_a.tpot > 1.5 * pure
    assert a.tpot <= 1.5 * pure + 4 * 0.5 * pure / 19
    # b's prompt is bought a chunk a window while a decodes, and finishes in the first steps after a ends.
    assert free_b.ttft < b.ttft
    assert b.sent_at + b.ttft <= a.sent_at + a.e2e + COSTS.prefill.step_ms([(430, 0)]) / 1e3


def test_without_decodes_or_with_the_credit_off_prompts_take_the_whole_budget() -> None:
    alone = [SimRequest(0.0, 1000, 2)]
    (on,) = simulate(CREDIT, COSTS, alone)
    (off,) = simulate(ClusterSpec("coloc"), COSTS, alone)
    assert on.ttft == off.ttft == pytest.approx((10 + 512 + 10 + 488) / 1e3)
    with pytest.raises(ValueError, match="fused_max_slowdown"):
        ClusterSpec("coloc", fused_max_slowdown=1.0)
