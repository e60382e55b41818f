"""Dispatch policies (a small registry): the order in which ready workers are tried for a request."""

from __future__ import annotations

import abc
import itertools
from collections.abc import Callable, Sequence

from contracts.stats import WorkerInfo


class UnknownPolicy(ValueError):
    """The configured dispatch_policy is not registered."""


class DispatchPolicy(abc.ABC):
    """Ranks candidate workers (all "ready") best first. The router reserves on decode workers in this order,
    falling back to the next on NoCapacity, and sends the prefill to the first prefill worker."""

    name: str = ""

    @abc.abstractmethod
    def order_decode(self, workers: Sequence[WorkerInfo]) -> list[WorkerInfo]: ...

    @abc.abstractmethod
    def order_prefill(self, workers: Sequence[WorkerInfo], num_prompt_tokens: int) -> list[WorkerInfo]: ...


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

    def order_decode(self, workers: Sequence[WorkerInfo]) -> list[WorkerInfo]:
        return sorted(
            workers,
            key=lambda w: (-w.stats.num_free_blocks, w.stats.num_running, w.stats.num_waiting, w.worker_id),
        )

    def order_prefill(self, workers: Sequence[WorkerInfo], num_prompt_tokens: int) -> list[WorkerInfo]:
        return sorted(
            workers,
            key=lambda w: (
                w.stats.queued_prefill_tokens,
                w.stats.num_running + w.stats.num_waiting,
                w.worker_id,
            ),
        )


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

    def order_decode(self, workers: Sequence[WorkerInfo]) -> list[WorkerInfo]:
        return self._rotate(workers, next(self._decode_turn))

    def order_prefill(self, workers: Sequence[WorkerInfo], num_prompt_tokens: int) -> list[WorkerInfo]:
        return self._rotate(workers, next(self._prefill_turn))
