"""Where each prompt is prefilled, on its decode worker or on the prefill pool (a small registry)."""
from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from contracts.stats import WorkerInfo
from prefill_worker.api import PrefillResult
from router.config import RouterConfig

NO_PREFILL_WORKER = "no_prefill_worker"


class UnknownPlacement(ValueError):
    """The configured prefill_placement is not registered."""


@dataclass(frozen=True)
class Placement:
    local: bool  # True: the decode worker prefills the prompt itself
    reason: str  # a metric label: why

    @property
    def where(self) -> str:
        return "local" if self.local else "remote"


class PlacementPolicy(abc.ABC):
    """Decides per request; `observe` feeds it what each remote prefill measured."""

    name: str = ""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config

    def place(self, num_tokens: int, prefill: Sequence[WorkerInfo],
              decode: Sequence[WorkerInfo]) -> Placement:
        """`prefill`, `decode`: the ready workers of each pool, as of the last refresh."""
        if not prefill:
            return Placement(True, NO_PREFILL_WORKER)  # degraded, not down: the decode worker prefills
        return self._place(num_tokens, prefill, decode)

    @abc.abstractmethod
    def _place(self, num_tokens: int, prefill: Sequence[WorkerInfo],
               decode: Sequence[WorkerInfo]) -> Placement: ...

    def observe(self, num_tokens: int, result: PrefillResult,  # noqa: B027
                round_trip_s: float) -> None:  # only cost-based policies learn: the base ignores it
        """A remote prefill of `num_tokens` finished: `result` has the compute and exposed-transfer time the
        prefill worker measured, `round_trip_s` the whole call as the router saw it."""


_POLICIES: dict[str, type[PlacementPolicy]] = {}


def register_placement(name: str) -> Callable[[type[PlacementPolicy]], type[PlacementPolicy]]:
    def register(cls: type[PlacementPolicy]) -> type[PlacementPolicy]:
        if name in _POLICIES:
            raise ValueError(f"placement policy {name!r} is already registered by {_POLICIES[name].__name__}")
        cls.name = name
        _POLICIES[name] = cls
        return cls

    return register


def known_placements() -> tuple[str, ...]:
    return tuple(sorted(_POLICIES))


def make_placement(config: RouterConfig) -> PlacementPolicy:
    try:
        return _POLICIES[config.prefill_placement](config)
    except KeyError:
        raise UnknownPlacement(f"unknown prefill placement {config.prefill_placement!r}; "
                               f"known: {', '.join(known_placements())}") from None


@register_placement("threshold")
class Threshold(PlacementPolicy):
    """Prompts of at most local_prefill_max_tokens tokens are prefilled on the decode worker (0 = never)."""

    def _place(self, num_tokens: int, prefill: Sequence[WorkerInfo],
               decode: Sequence[WorkerInfo]) -> Placement:
        if num_tokens <= self.config.local_prefill_max_tokens:
            return Placement(True, "under_threshold")
        return Placement(False, "over_threshold")


class _Ewma:
    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha, self.value, self.count = alpha, 0.0, 0

    def add(self, x: float) -> None:
        self.value = x if self.count == 0 else self.value + self.alpha * (x - self.value)
        self.count += 1


@register_placement("cost")
class Cost(PlacementPolicy):
    """Compares the delay each choice adds, from costs measured on remote prefills (EWMA):

    remote = the least-queued prefill worker's wait (queued tokens x s/token) + n x (compute + exposed
             transfer s/token) + the call's own overhead (round trip minus both);
    local  = n x compute s/token x (1 + r): the prompt's own wait, and each of the r sequences the least
             busy decode worker runs is held back as long (split-fused steps share one budget).

    So an idle decode worker prefills short prompts itself (no transfer, no hop), a busy one leaves them to
    the pool, and a long pool queue pulls prompts local. A prompt longer than the decode worker's budget
    (local_prefill_budget_tokens) always goes remote; until `warmup` remote prefills were measured there is
    nothing to compare, so everything goes remote, as a fully disaggregated cluster does.
    """

    def __init__(self, config: RouterConfig, warmup: int = 8) -> None:
        super().__init__(config)
        self.warmup = warmup
        self.compute_s_per_token = _Ewma()
        self.transfer_s_per_token = _Ewma()
        self.overhead_s = _Ewma()

    def observe(self, num_tokens: int, result: PrefillResult, round_trip_s: float) -> None:
        n = max(1, num_tokens)
        prefill_s, exposed_transfer_s = result.prefill_seconds, result.transfer_exposed_seconds
        self.compute_s_per_token.add(prefill_s / n)
        self.transfer_s_per_token.add(exposed_transfer_s / n)
        self.overhead_s.add(max(0.0, round_trip_s - prefill_s - exposed_transfer_s))

    def estimates(self, num_tokens: int, prefill: Sequence[WorkerInfo],
                  decode: Sequence[WorkerInfo]) -> tuple[float, float]:
        """(local, remote) seconds of delay this prompt adds, by the costs measured so far."""
        c = self.compute_s_per_token.value
        wait = min(w.stats.queued_prefill_tokens for w in prefill) * c
        remote = wait + num_tokens * (c + self.transfer_s_per_token.value) + self.overhead_s.value
        running = min((w.stats.num_running for w in decode), default=0)
        return num_tokens * c * (1 + running), remote

    def _place(self, num_tokens: int, prefill: Sequence[WorkerInfo],
               decode: Sequence[WorkerInfo]) -> Placement:
        if num_tokens > self.config.local_prefill_budget_tokens:
            return Placement(False, "over_decode_budget")
        if self.compute_s_per_token.count < self.warmup:
            return Placement(False, "warming_up")
        local, remote = self.estimates(num_tokens, prefill, decode)
        return Placement(True, "local_cheaper") if local < remote else Placement(False, "remote_cheaper")
