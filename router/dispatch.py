"""Dispatch policies (a small registry): the order in which ready workers are tried for a request."""

from __future__ import annotations

import abc
import itertools
import random
from collections.abc import Callable, Sequence

from contracts.prefix_hash import block_hashes
from contracts.stats import WorkerInfo


class UnknownPolicy(ValueError):
    """The configured dispatch_policy is not registered."""


class PromptBlocks:
    """A request's prompt as the prefix cache names it: chain hashes of its full blocks, computed once per
    block size that a candidate worker uses (the same function the workers use, contracts/prefix_hash.py)."""

    def __init__(self, token_ids: Sequence[int]) -> None:
        self.token_ids = token_ids
        self._hashes: dict[int, list[int]] = {}

    def hashes(self, block_size: int) -> list[int]:
        if block_size < 1:
            return []
        found = self._hashes.get(block_size)
        if found is None:
            found = self._hashes[block_size] = block_hashes(self.token_ids, block_size)
        return found

    def cached_tokens(self, worker: WorkerInfo) -> int:
        """Prompt tokens `worker` holds in its prefix cache (by its last info snapshot)."""
        return worker.cached_prefix_blocks(self.hashes(worker.block_size)) * worker.block_size


class DispatchPolicy(abc.ABC):
    """Ranks candidate workers (all "ready") best first. The router reserves on decode workers in this order,
    falling back to the next on NoCapacity, and sends the prefill to the first prefill worker. `prompt`
    names the request's blocks for policies that look at the workers' prefix caches."""

    name: str = ""

    @abc.abstractmethod
    def order_decode(self, workers: Sequence[WorkerInfo], *,
                     prompt: PromptBlocks | None = None) -> list[WorkerInfo]: ...

    @abc.abstractmethod
    def order_prefill(self, workers: Sequence[WorkerInfo], num_prompt_tokens: int, *,
                      prompt: PromptBlocks | None = None) -> list[WorkerInfo]: ...


_POLICIES: dict[str, type[DispatchPolicy]] = {}


def register_policy(name: str) -> Callable[[type[DispatchPolicy]], type[DispatchPolicy]]:
    def register(cls: type[DispatchPolicy]) -> type[DispatchPolicy]:
        if name in _POLICIES:
            raise ValueError(f"dispatch policy {name!r} is already registered by {_POLICIES[name].__name__}")
        cls.name = name
        _POLICIES[name] = cls
        return cls

    return register


def known_policies() -> tuple[str, ...]:
    return tuple(sorted(_POLICIES))


def make_policy(name: str) -> DispatchPolicy:
    try:
        return _POLICIES[name]()
    except KeyError:
        raise UnknownPolicy(
            f"unknown dispatch policy {name!r}; known: {', '.join(known_policies())}"
        ) from None


@register_policy("least_loaded")
class LeastLoaded(DispatchPolicy):
    """Decode: most free KV blocks, then fewest running, then fewest waiting. Prefill: fewest queued prompt
    tokens, then fewest requests. Worker id breaks ties so the order is deterministic."""

    def order_decode(self, workers: Sequence[WorkerInfo], *,
                     prompt: PromptBlocks | None = None) -> list[WorkerInfo]:
        return sorted(workers, key=_decode_load)

    def order_prefill(self, workers: Sequence[WorkerInfo], num_prompt_tokens: int, *,
                      prompt: PromptBlocks | None = None) -> list[WorkerInfo]:
        return sorted(workers, key=_prefill_load)


def _decode_load(w: WorkerInfo) -> tuple[int, int, int, str]:
    return (-w.stats.num_free_blocks, w.stats.num_running, w.stats.num_waiting, w.worker_id)


def _prefill_load(w: WorkerInfo) -> tuple[int, int, str]:
    return (w.stats.queued_prefill_tokens, w.stats.num_running + w.stats.num_waiting, w.worker_id)


@register_policy("round_robin")
class RoundRobin(DispatchPolicy):
    """Rotates through workers regardless of load (a baseline for benchmarks)."""

    def __init__(self) -> None:
        self._decode_turn = itertools.count()
        self._prefill_turn = itertools.count()

    @staticmethod
    def _rotate(workers: Sequence[WorkerInfo], turn: int) -> list[WorkerInfo]:
        ordered = sorted(workers, key=lambda w: w.worker_id)  # stable base order as workers come and go
        if not ordered:
            return []
        k = turn % len(ordered)
        return ordered[k:] + ordered[:k]

    def order_decode(self, workers: Sequence[WorkerInfo], *,
                     prompt: PromptBlocks | None = None) -> list[WorkerInfo]:
        return self._rotate(workers, next(self._decode_turn))

    def order_prefill(self, workers: Sequence[WorkerInfo], num_prompt_tokens: int, *,
                      prompt: PromptBlocks | None = None) -> list[WorkerInfo]:
        return self._rotate(workers, next(self._prefill_turn))


@register_policy("prefix_aware")
class PrefixAware(DispatchPolicy):
    """Sends a request where its prefix is cached, unless that worker is much busier; with no cached prefix
    anywhere, power-of-two choices (two workers at random, the less loaded first) spreads load without
    herding every request onto the one worker that looked idlest at the last refresh.

    Prefill: ranked by the tokens a worker must compute before this prompt is done — its queued prompt
    tokens plus the part of this prompt it does not hold. Decode: among workers running at most
    `decode_slack` more sequences than the least busy, the longest cached prefix first (it also travels
    less: only the missing suffix's KV is sent); the others after, least loaded first.
    """

    def __init__(self, decode_slack: int = 4, seed: int | None = None) -> None:
        self.decode_slack = decode_slack
        self._rng = random.Random(seed)

    def order_decode(self, workers: Sequence[WorkerInfo], *,
                     prompt: PromptBlocks | None = None) -> list[WorkerInfo]:
        hits = {w.worker_id: prompt.cached_tokens(w) for w in workers} if prompt is not None else {}
        if not any(hits.values()):
            return self._two_choices(workers, _decode_load)
        least = min(w.stats.num_running for w in workers)
        near = [w for w in workers if w.stats.num_running <= least + self.decode_slack]
        busy = [w for w in workers if w.stats.num_running > least + self.decode_slack]
        near.sort(key=lambda w: (-hits[w.worker_id], *_decode_load(w)))
        return near + sorted(busy, key=_decode_load)

    def order_prefill(self, workers: Sequence[WorkerInfo], num_prompt_tokens: int, *,
                      prompt: PromptBlocks | None = None) -> list[WorkerInfo]:
        hits = {w.worker_id: prompt.cached_tokens(w) for w in workers} if prompt is not None else {}
        if not any(hits.values()):
            return self._two_choices(workers, _prefill_load)

        def cost(w: WorkerInfo) -> tuple[int, int, str]:
            todo = w.stats.queued_prefill_tokens + num_prompt_tokens - hits[w.worker_id]
            return (todo, w.stats.num_running + w.stats.num_waiting, w.worker_id)

        return sorted(workers, key=cost)

    def _two_choices(self, workers: Sequence[WorkerInfo],
                     load: Callable[[WorkerInfo], tuple]) -> list[WorkerInfo]:
        if len(workers) <= 2:
            return sorted(workers, key=load)
        picked = sorted(self._rng.sample(list(workers), 2), key=load)
        ids = {w.worker_id for w in picked}
        return picked + sorted((w for w in workers if w.worker_id not in ids), key=load)
