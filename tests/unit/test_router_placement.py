"""Prefill placement: the threshold policy, and the cost policy's decisions from measured costs."""
from __future__ import annotations

import pytest

from contracts.stats import EngineStats, WorkerInfo
from prefill_worker.api import PrefillResult
from router.config import RouterConfig
from router.placement import NO_PREFILL_WORKER, Placement, UnknownPlacement, known_placements, make_placement

pytestmark = pytest.mark.timeout(30)


def info(wid: str, role: str, running: int = 0, queued: int = 0, **measured: float) -> WorkerInfo:
    """`measured`: the decode worker's num_awaiting_kv, prefill_s_per_token, fused_prefill_s_per_token."""
    return WorkerInfo(wid, role, "ready", EngineStats(100, 100, running, 0, queued, **measured))


PREFILL = [info("p0", "prefill")]
IDLE_DECODE = [info("d0", "decode")]


def warmed(**cfg) -> object:
    """A cost policy that has measured 8 remote prefills: 1 ms/token compute, 0.1 ms/token exposed
    transfer, 20 ms of call overhead."""
    policy = make_placement(RouterConfig(**cfg))
    for _ in range(8):
        policy.observe(100, PrefillResult("r", 1, 0.0, 0.1, 0.01), round_trip_s=0.13)
    return policy


def test_threshold_places_by_prompt_length_only() -> None:
    policy = make_placement(RouterConfig(prefill_placement="threshold", local_prefill_max_tokens=8))
    assert policy.place(8, PREFILL, IDLE_DECODE) == Placement(True, "under_threshold")
    assert policy.place(9, PREFILL, IDLE_DECODE) == Placement(False, "over_threshold")


def test_without_a_prefill_worker_every_policy_prefills_locally() -> None:
    for name in known_placements():
        placement = make_placement(RouterConfig(prefill_placement=name)).place(1000, [], IDLE_DECODE)
        assert placement == Placement(True, NO_PREFILL_WORKER) and placement.where == "local"


def test_cost_goes_remote_until_it_has_measured_remote_prefills() -> None:
    policy = make_placement(RouterConfig())
    assert policy.name == "cost"  # the default
    assert policy.place(10, PREFILL, IDLE_DECODE) == Placement(False, "warming_up")


def test_cost_prefills_short_prompts_on_an_idle_decode_worker_at_the_pools_pace_until_it_measured_its_own():
    policy = warmed()
    assert policy.estimates(100, PREFILL, IDLE_DECODE) == pytest.approx((0.1, 0.0, 0.1 + 0.01 + 0.02))
    assert policy.place(100, PREFILL, IDLE_DECODE) == Placement(True, "local_cheaper")
    slow = [info("d0", "decode", prefill_s_per_token=0.005)]  # its own prefill-only steps, measured
    assert policy.estimates(100, PREFILL, slow)[0] == pytest.approx(0.5)
    assert policy.place(100, PREFILL, slow) == Placement(False, "remote_cheaper")


def test_cost_prices_a_prompt_beside_running_decodes_at_the_credits_measured_pace():
    policy = warmed()
    busy = [info("d0", "decode", running=1, fused_prefill_s_per_token=0.004)]
    assert policy.estimates(100, PREFILL, busy)[0] == pytest.approx(0.4)
    assert policy.place(100, PREFILL, busy) == Placement(False, "remote_cheaper")
    # The old price, n x pool pace x (1 + running) = 0.2 s, would have put it local behind a 150 ms queue.
    backed_up = [info("p0", "prefill", queued=150)]
    assert policy.place(100, backed_up, busy).local is False
    assert policy.place(100, [info("p0", "prefill", queued=1000)], busy) == Placement(True, "local_cheaper")
    unmeasured = [info("d0", "decode", running=3)]  # no fused step timed yet: n x pace x (1 + running)
    assert policy.estimates(100, PREFILL, unmeasured)[0] == pytest.approx(0.4)


def test_cost_counts_the_prompts_already_queued_on_the_decode_worker_and_the_pace_behind_them():
    policy = warmed()
    pool = [info("p0", "prefill", queued=300)]  # remote: 0.3 + 0.11 + 0.02
    assert policy.place(100, pool, IDLE_DECODE) == Placement(True, "local_cheaper")
    # 200 tokens ahead at 1 ms; its own 100 beside their decode once they have their first token: 4 ms each.
    queued = [info("d0", "decode", queued=200, fused_prefill_s_per_token=0.004)]
    assert policy.estimates(100, pool, queued)[0] == pytest.approx(0.2 + 0.4)
    assert policy.place(100, pool, queued) == Placement(False, "remote_cheaper")
    unmeasured = [info("d0", "decode", queued=200)]  # no fused pace yet: twice the prefill-only one
    assert policy.estimates(100, pool, unmeasured)[0] == pytest.approx(0.2 + 0.2)


def test_cost_weighs_the_wait_a_prefill_only_step_adds_to_transfers_landing_meanwhile():
    policy = warmed()
    pool = [info("p0", "prefill", queued=150)]  # remote: 0.15 + 200 x 1.1 ms + 0.02 = 0.39 s
    assert policy.place(200, pool, IDLE_DECODE) == Placement(True, "local_cheaper")  # 0.2 s, no one waits
    inflight = [info("d0", "decode", running=2, num_awaiting_kv=2)]  # both land within its 0.2 s step
    local, harm, remote = policy.estimates(200, pool, inflight)
    assert (local, harm, remote) == pytest.approx((0.2, 2 * 0.2 / 2, 0.39))
    assert policy.place(200, pool, inflight) == Placement(False, "remote_cheaper")
    # A long pool queue spreads their landings: one lands during the step with odds 0.2 / 1.02.
    long_pool = [info("p0", "prefill", queued=1000)]
    one_inflight = [info("d0", "decode", running=1, num_awaiting_kv=1)]
    local, harm, remote = policy.estimates(200, long_pool, one_inflight)
    assert harm == pytest.approx(0.2 / 1.02 * 0.1) and local + harm < remote


def test_cost_with_a_ttft_slo_holds_no_transfer_in_flight_past_its_slack():
    one_inflight = [info("d0", "decode", running=1, num_awaiting_kv=1)]
    long_pool = [info("p0", "prefill", queued=1000)]  # remote 1.24 s; local 0.2 s
    assert warmed(placement_ttft_slo_s=2.0).place(200, long_pool, one_inflight).local is True
    tight = warmed(placement_ttft_slo_s=1.4)  # slack 0.16 s < the 0.2 s step
    assert tight.place(200, long_pool, one_inflight) == Placement(False, "holds_transfers")
    assert tight.place(200, long_pool, IDLE_DECODE).local is True  # nothing in flight to hold
    with pytest.raises(ValueError, match="placement_ttft_slo_s"):
        RouterConfig(placement_ttft_slo_s=0.0)


def test_cost_takes_the_decode_worker_where_the_prompt_costs_least():
    policy = warmed()
    workers = [info("d0", "decode", running=8, fused_prefill_s_per_token=0.01), info("d1", "decode")]
    assert policy.estimates(100, PREFILL, workers) == pytest.approx((0.1, 0.0, 0.13))


def test_cost_never_prefills_beyond_the_decode_budget_locally() -> None:
    policy = warmed(local_prefill_budget_tokens=64)
    assert policy.place(65, PREFILL, IDLE_DECODE) == Placement(False, "over_decode_budget")


def test_unknown_placement_names_the_known_ones() -> None:
    with pytest.raises(UnknownPlacement, match="cost, threshold"):
        make_placement(RouterConfig(prefill_placement="coin"))
