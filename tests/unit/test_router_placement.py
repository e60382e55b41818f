"""Prefill placement: the threshold policy, and the cost policy's decisions from measured costs."""
from __future__ import annotations

import pytest

from contracts.stats import EngineStats, WorkerInfo
from prefill_worker.api import PrefillResult
from router.config import RouterConfig
from router.placement import NO_PREFILL_WORKER, Placement, UnknownPlacement, known_placements, make_placement

pytestmark = pytest.mark.timeout(30)


def info(wid: str, role: str, running: int = 0, queued: int = 0) -> WorkerInfo:
    return WorkerInfo(wid, role, "ready", EngineStats(100, 100, running, 0, queued))


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


def test_cost_prefills_short_prompts_on_an_idle_decode_worker_and_leaves_them_to_the_pool_when_busy() -> None:
    policy = warmed()
    local, remote = policy.estimates(100, PREFILL, IDLE_DECODE)
    assert local == pytest.approx(0.1) and remote == pytest.approx(0.1 + 0.01 + 0.02)
    assert policy.place(100, PREFILL, IDLE_DECODE) == Placement(True, "local_cheaper")
    busy = [info("d0", "decode", running=8), info("d1", "decode", running=3)]
    assert policy.place(100, PREFILL, busy) == Placement(False, "remote_cheaper")


def test_cost_pulls_prompts_local_when_the_prefill_pool_is_backed_up() -> None:
    policy = warmed()
    busy = [info("d0", "decode", running=3)]
    assert policy.place(100, [info("p0", "prefill", queued=100)], busy).local is False
    assert policy.place(100, [info("p0", "prefill", queued=1000)], busy) == Placement(True, "local_cheaper")


def test_cost_never_prefills_beyond_the_decode_budget_locally() -> None:
    policy = warmed(local_prefill_budget_tokens=64)
    assert policy.place(65, PREFILL, IDLE_DECODE) == Placement(False, "over_decode_budget")


def test_unknown_placement_names_the_known_ones() -> None:
    with pytest.raises(UnknownPlacement, match="cost, threshold"):
        make_placement(RouterConfig(prefill_placement="coin"))
