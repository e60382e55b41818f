"""Capacity bounds from step costs: a request's prefill and decode work, and what N workers can serve."""
from __future__ import annotations

import pytest

from bench.serving.metrics import Slo
from bench.serving.sim_bound import bounds, request_work
from bench.serving.sim_costs import DecodeCost, PrefillCost, StepCosts, TransferCost
from bench.serving.sim_search import Mix
from bench.serving.workload import parse_length

# A prompt of 100-300 tokens at 1 ms a token (200 ms on average); an answer of 11 tokens = 10 decode steps of
# 20 ms + 5 ms a stream: 250 ms alone, 10 x 60 / 8 = 75 ms of a batch of 8, 50 ms riding in prefill steps.
COSTS = StepCosts(prefill=PrefillCost(0.0, 1.0), decode=DecodeCost(20.0, 5.0),
                  transfer=TransferCost(1, 1, 1.0))
MIX = Mix("built", parse_length("uniform:100:300"), parse_length("fixed:11"), Slo(ttft=1.0, tpot=0.06))


def test_a_requests_work_is_its_mean_prefill_and_its_share_of_decode_steps() -> None:
    work = request_work(COSTS, MIX)
    assert work.prefill_s == pytest.approx(0.2)
    assert (work.decode_s(1), work.decode_s(8), work.fused_decode_s()) == pytest.approx((0.25, 0.075, 0.05))
    assert work.max_batch(0.06) == 8  # 20 + 5 x 8 = 60 ms
    assert work.batch_at(1.0, cap=8) == 1.0  # 0.25 s of decode a second: the batch never fills
    assert work.batch_at(100.0, cap=8) == 8.0


def test_bounds_put_every_worker_on_the_work_and_the_prefill_worker_alone_on_prompts() -> None:
    coloc, fused, pure, cond_slo, cond = bounds(request_work(COSTS, MIX), MIX.slo.tpot, workers=2, speed=0.5)
    assert coloc.req_per_s == pytest.approx(1 / 0.45)
    assert fused.req_per_s == pytest.approx(1 / 0.25)
    assert pure.req_per_s == pytest.approx(0.5 / 0.2)  # min(prefill 2.5, decode 0.5 / 0.075)
    assert cond_slo.req_per_s == pytest.approx(1 / 0.275)
    assert cond.req_per_s == pytest.approx(1 / 0.45)  # ~2.2 req/s keep half a stream decoding: batch 1
