"""Dispatch policies: least_loaded ordering, round_robin rotation, registry errors."""

from __future__ import annotations

import pytest

from contracts.stats import EngineStats, WorkerInfo
from router.dispatch import DispatchPolicy, UnknownPolicy, known_policies, make_policy, register_policy

pytestmark = pytest.mark.timeout(30)


def worker(
    wid: str, role: str = "decode", free: int = 10, running: int = 0, waiting: int = 0, queued: int = 0
) -> WorkerInfo:
    return WorkerInfo(wid, role, "ready", EngineStats(free, 100, running, waiting, queued))


def ids(workers: list[WorkerInfo]) -> list[str]:
    return [w.worker_id for w in workers]


def test_least_loaded_decode_prefers_free_blocks_then_fewest_running() -> None:
    policy = make_policy("least_loaded")
    workers = [
        worker("a", free=10, running=1),
        worker("b", free=50, running=9),
        worker("c", free=10, running=0),
    ]
    assert ids(policy.order_decode(workers)) == ["b", "c", "a"]


def test_least_loaded_prefill_prefers_fewest_queued_tokens() -> None:
    policy = make_policy("least_loaded")
    workers = [
        worker("p0", "prefill", queued=900),
        worker("p1", "prefill", queued=10),
        worker("p2", "prefill", queued=10, running=3),
    ]
    assert ids(policy.order_prefill(workers, num_prompt_tokens=100)) == ["p1", "p2", "p0"]


def test_round_robin_rotates_through_workers_regardless_of_load() -> None:
    policy = make_policy("round_robin")
    workers = [worker("b", free=1), worker("a", free=99), worker("c")]
    firsts = [policy.order_decode(workers)[0].worker_id for _ in range(4)]
    assert firsts == ["a", "b", "c", "a"]
    assert sorted(ids(policy.order_decode(workers))) == ["a", "b", "c"]  # fallbacks still listed
    assert policy.order_prefill([], 5) == []


def test_unknown_policy_error_lists_the_known_ones() -> None:
    with pytest.raises(UnknownPolicy) as info:
        make_policy("fastest")
    assert "'fastest'" in str(info.value)
    for name in ("least_loaded", "round_robin"):
        assert name in str(info.value)


def test_registered_policy_is_made_by_name_and_names_cannot_be_reused() -> None:
    @register_policy("test_reverse_ids")
    class ReverseIds(DispatchPolicy):
        def order_decode(self, workers):  # type: ignore[no-untyped-def]
            return sorted(workers, key=lambda w: w.worker_id, reverse=True)

        def order_prefill(self, workers, num_prompt_tokens):  # type: ignore[no-untyped-def]
            return self.order_decode(workers)

    assert "test_reverse_ids" in known_policies()
    policy = make_policy("test_reverse_ids")
    assert policy.name == "test_reverse_ids"
    assert ids(policy.order_decode([worker("a"), worker("b")])) == ["b", "a"]
    with pytest.raises(ValueError, match="already registered"):
        register_policy("test_reverse_ids")(ReverseIds)
