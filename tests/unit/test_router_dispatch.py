"""Dispatch policies: least_loaded ordering, round_robin rotation, registry errors."""

from __future__ import annotations

import dataclasses

import pytest

from contracts.prefix_hash import block_hashes
from contracts.stats import EngineStats, WorkerInfo
from router.dispatch import (
    DispatchPolicy,
    PrefixAware,
    PromptBlocks,
    UnknownPolicy,
    known_policies,
    make_policy,
    register_policy,
)

pytestmark = pytest.mark.timeout(30)


def worker(
    wid: str, role: str = "decode", free: int = 10, running: int = 0, waiting: int = 0, queued: int = 0
) -> WorkerInfo:
    return WorkerInfo(wid, role, "ready", EngineStats(free, 100, running, waiting, queued))


def cached(info: WorkerInfo, tokens: list[int], block_size: int = 4) -> WorkerInfo:
    """`info` whose prefix cache holds every full block of `tokens`."""
    hashes = frozenset(block_hashes(tokens, block_size))
    return dataclasses.replace(info, block_size=block_size, cached_blocks=hashes)


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


SYSTEM = list(range(1, 33))  # 8 blocks of 4


def test_prefix_aware_prefers_the_worker_holding_the_longest_prefix() -> None:
    policy = make_policy("prefix_aware")
    prompt = PromptBlocks(SYSTEM + [99, 98])
    workers = [cached(worker("short", running=0), SYSTEM[:8]), worker("none", free=90),
               cached(worker("long", running=2), SYSTEM)]
    assert ids(policy.order_decode(workers, prompt=prompt))[0] == "long"
    prefill = [cached(worker("p-long", "prefill", queued=10), SYSTEM), worker("p-idle", "prefill")]
    # p-long must compute 10 queued + 2 missing tokens; p-idle all 34 of this prompt.
    assert ids(policy.order_prefill(prefill, 34, prompt=prompt)) == ["p-long", "p-idle"]


def test_prefix_aware_balances_a_hit_against_load() -> None:
    policy = PrefixAware(decode_slack=4)
    prompt = PromptBlocks(SYSTEM + [99])
    workers = [cached(worker("hot", running=20), SYSTEM), worker("idle", running=1)]
    assert ids(policy.order_decode(workers, prompt=prompt)) == ["idle", "hot"]
    prefill = [cached(worker("p-hot", "prefill", queued=500), SYSTEM), worker("p-idle", "prefill", queued=0)]
    assert ids(policy.order_prefill(prefill, 33, prompt=prompt)) == ["p-idle", "p-hot"]


def test_prefix_aware_without_a_hit_uses_two_random_choices_and_lists_everyone() -> None:
    policy = PrefixAware(seed=1)
    workers = [worker(w, free=f) for w, f in (("a", 10), ("b", 20), ("c", 30), ("d", 40))]
    firsts = set()
    for _ in range(40):
        order = policy.order_decode(workers, prompt=PromptBlocks([5, 6, 7, 8, 9]))
        assert sorted(ids(order)) == ["a", "b", "c", "d"]
        assert order[0].worker_id != "a"  # the less loaded of any two is first: "a" never is
        firsts.add(order[0].worker_id)
    assert len(firsts) > 1  # not herded onto one worker
    assert ids(policy.order_prefill(workers[:2], 5)) == ["a", "b"]  # two workers: least loaded order
