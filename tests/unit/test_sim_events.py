"""The simulator's event loop on hand-checked cases: one TTFT, contention, chunks, KV, colocation."""
from __future__ import annotations

import pytest

from bench.serving.sim_costs import DecodeCost, PrefillCost, StepCosts, TransferCost
from bench.serving.sim_events import ClusterSpec, SimRequest, simulate

# 10 ms + 1 ms a prompt token; decode 20 ms + 5 ms a stream; 1000 B a token over 10 layers at 1 GB/s.
COSTS = StepCosts(prefill=PrefillCost(10.0, 1.0), decode=DecodeCost(20.0, 5.0),
                  transfer=TransferCost(1000, 10, 1.0, latency_ms=2.0), router_ms=3.0)
DISAGG = ClusterSpec("disagg")
COLOC = ClusterSpec("coloc")


def test_one_request_ttft_is_router_plus_prefill_plus_exposed_transfer() -> None:
    # The decode worker is idle, so the first token goes out when the KV lands (decode_worker/service.py
    # pushes the prefill's token at activation); each later token costs one decode step of batch 1.
    (r,) = simulate(DISAGG, COSTS, [SimRequest(0.0, 100, 5)])
    prefill_ms = 10 + 100
    exposed_ms = COSTS.transfer.exposed_ms(100, prefill_ms)
    assert exposed_ms == pytest.approx(2.0 + 0.01)  # latency + last layer's share: compute hides the rest
    assert r.ttft == pytest.approx((3 + prefill_ms + exposed_ms) / 1e3)
    assert r.tpot == pytest.approx(0.025)
    assert r.e2e == pytest.approx(r.ttft + 4 * 0.025)


def test_exposed_transfer_is_what_the_final_step_cannot_hide() -> None:
    t = TransferCost(kv_bytes_per_token=1_000_000, num_layers=4, gb_per_s=1.0)  # 1 ms a token
    assert t.total_ms(100) == pytest.approx(100.0)
    assert t.exposed_ms(100, final_step_ms=40.0) == pytest.approx(100 - 30)  # link-bound
    assert t.exposed_ms(100, final_step_ms=1000.0) == pytest.approx(25.0)  # the last layer's quarter


def test_two_requests_queue_on_the_prefill_worker_then_share_decode_steps() -> None:
    a, b = simulate(DISAGG, COSTS, [SimRequest(0.0, 100, 3), SimRequest(0.0, 100, 3)])
    exposed = COSTS.transfer.exposed_ms(100, 110) / 1e3
    assert a.ttft == pytest.approx(0.003 + 0.110 + exposed)
    # b reached the prefill worker while a's step ran: it waits for it, then runs its own.
    assert b.ttft == pytest.approx(0.003 + 0.220 + exposed)
    # a decodes alone (25 ms) until b joins at a step boundary; a's two steps end at 0.138 and 0.163 s
    # (no overlap with b, which activates at ~0.235 s): a's TPOT is the batch-1 step.
    assert a.tpot == pytest.approx(0.025)
    assert b.tpot == pytest.approx(0.025)


def test_streams_decoding_together_pay_the_batch_step() -> None:
    costs = StepCosts(PrefillCost(0.0, 0.0), DecodeCost(20.0, 5.0), TransferCost(1, 1, 1.0))
    a, b = simulate(DISAGG, costs, [SimRequest(0.0, 1, 11), SimRequest(0.0, 1, 11)])
    # a's KV lands first and its step starts at once; b joins at that step's end (a step boundary).
    assert a.ttft == pytest.approx(0.0, abs=1e-6)
    assert b.ttft == pytest.approx(0.025)
    # Nine steps of both (20 + 5 x 2 ms) and one alone (25 ms) each.
    assert a.tpot == pytest.approx((9 * 0.030 + 0.025) / 10)
    assert b.tpot == pytest.approx(a.tpot)


def test_long_prompts_are_chunked_under_the_token_budget_with_the_attention_term() -> None:
    costs = StepCosts(PrefillCost(10.0, 1.0, per_pair_ms=0.001), DecodeCost(1.0, 0.0),
                      TransferCost(1, 1, 1e9))
    spec = ClusterSpec("disagg", max_batch_tokens=512)
    (r,) = simulate(spec, costs, [SimRequest(0.0, 1000, 2)])
    first = 10 + 512 + 0.001 * 512 * 256
    second = 10 + 488 + 0.001 * 488 * (512 + 244)
    assert r.ttft == pytest.approx((first + second) / 1e3, rel=1e-6)


def test_colocated_prefill_stalls_the_running_stream() -> None:
    # a decodes when b arrives: the step carrying b's prompt costs decode + b's marginal prefill.
    a, b = simulate(COLOC, COSTS, [SimRequest(0.0, 10, 4), SimRequest(0.05, 100, 2)])
    assert a.ttft == pytest.approx(0.003 + 0.020)  # 10 + 10 tokens, then its first token
    # a's steps: 23 -> 48 ms (batch 1), 48 -> 73, then b is queued (arrived at 53 ms): 73 -> 73 + 25 + 100.
    assert a.e2e == pytest.approx(0.073 + 0.125)
    assert b.ttft == pytest.approx(0.198 - 0.05)
    assert a.tpot == pytest.approx((0.198 - 0.023) / 3)


def test_kv_capacity_holds_the_next_request_in_the_router_queue() -> None:
    spec = ClusterSpec("disagg", kv_capacity_tokens=110)
    a, b = simulate(spec, COSTS, [SimRequest(0.0, 100, 5), SimRequest(0.0, 100, 5)])
    assert b.sent_at + b.ttft > a.sent_at + a.e2e  # dispatched only once a's KV was freed


def test_workers_sharing_a_host_slow_each_other() -> None:
    costs = StepCosts(PrefillCost(100.0, 0.0), DecodeCost(10.0, 0.0), TransferCost(1, 1, 1e9), contention=1.0)
    a, b = simulate(DISAGG, costs, [SimRequest(0.0, 1, 3), SimRequest(0.1, 1, 2)])
    # a's decode steps start at 0.1 s while b's prefill runs: both cost 2x.
    assert a.tpot == pytest.approx(0.020)


def test_a_request_larger_than_a_worker_is_refused() -> None:
    with pytest.raises(ValueError, match="KV tokens"):
        simulate(ClusterSpec("disagg", kv_capacity_tokens=10), COSTS, [SimRequest(0.0, 10, 5)])


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="mode"):
        ClusterSpec("hybrid")
