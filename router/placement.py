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
    """Prefills a prompt on a decode worker only where its first token comes sooner that way, counting the
    delay it adds to the worker's transfers in flight; from costs measured on both sides:

    remote = the least-queued prefill worker's wait (queued tokens x s/token) + n x (compute + exposed
             transfer s/token) + the call's own overhead (round trip minus both): EWMAs of remote prefills;
    local  = (the decode worker's queued local prompt tokens + n) x its measured pace: beside running
             sequences the split-fused credit's (`fused_prefill_s_per_token`: the credit lets prefill have
             only (s - 1) / s of the wall clock, and on CPU each chunk leaves the flat decode path), else a
             prefill-only step's (`prefill_s_per_token`; the pool's own s/token until the worker measured);
             a prompt queued behind another local one pays the credit's pace for its own n tokens, as it
             will prefill beside that one's decode;
    harm   = on a worker running no sequences the prompt runs in prefill-only steps of about `local`
             seconds, and the engine admits a landed transfer only between steps: each of its transfers in
             flight lands meanwhile with odds local / (the pool's drain time) and then waits local / 2.

    Local iff local + harm < remote; with `placement_ttft_slo_s`, also not where the steps would hold a
    transfer in flight past that SLO (its slack taken as the SLO minus today's remote estimate). A prompt
    longer than local_prefill_budget_tokens always goes remote; until `warmup` remote prefills were
    measured there is nothing to compare, so everything goes remote, as a fully disaggregated cluster does.
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

    def remote(self, num_tokens: int, prefill: Sequence[WorkerInfo]) -> float:
        """Seconds until this prompt's KV would land, by the costs measured so far."""
        c = self.compute_s_per_token.value
        wait = min(w.stats.queued_prefill_tokens for w in prefill) * c
        return wait + num_tokens * (c + self.transfer_s_per_token.value) + self.overhead_s.value

    def local(self, num_tokens: int, decode: WorkerInfo,
              prefill: Sequence[WorkerInfo]) -> tuple[float, float]:
        """(seconds until this prompt's first token on `decode`, seconds of delay it adds to the transfers
        in flight to it)."""
        s, c = decode.stats, self.compute_s_per_token.value
        alone = s.prefill_s_per_token or c  # the same model on the same kind of core until measured
        beside = s.num_running - s.num_awaiting_kv  # sequences it runs now: decoding, or prefilling
        paced = s.fused_prefill_s_per_token or alone * (1 + max(1, beside))
        # Behind a local prompt, this one runs beside that prompt's decode once it has its first token.
        own = paced if beside or s.queued_prefill_tokens else alone
        seconds = s.queued_prefill_tokens * (paced if beside else alone) + num_tokens * own
        if beside or not s.num_awaiting_kv:
            return seconds, 0.0  # beside running sequences it goes in credit-sized chunks
        drain = max(w.stats.queued_prefill_tokens for w in prefill) * c + self.overhead_s.value
        landing = 1.0 if drain <= seconds else seconds / drain
        return seconds, s.num_awaiting_kv * landing * seconds / 2

    def estimates(self, num_tokens: int, prefill: Sequence[WorkerInfo],
                  decode: Sequence[WorkerInfo]) -> tuple[float, float, float]:
        """(local, its harm, remote) seconds on the decode worker where local + harm is least."""
        remote = self.remote(num_tokens, prefill)
        if not decode:
            return float("inf"), 0.0, remote
        local, harm = min((self.local(num_tokens, w, prefill) for w in decode), key=sum)
        return local, harm, remote

    def _place(self, num_tokens: int, prefill: Sequence[WorkerInfo],
               decode: Sequence[WorkerInfo]) -> Placement:
        if num_tokens > self.config.local_prefill_budget_tokens:
            return Placement(False, "over_decode_budget")
        if self.compute_s_per_token.count < self.warmup:
            return Placement(False, "warming_up")
        local, harm, remote = self.estimates(num_tokens, prefill, decode)
        if local + harm >= remote:
            return Placement(False, "remote_cheaper")
        slo = self.config.placement_ttft_slo_s
        if harm and slo is not None and local > slo - remote:
            return Placement(False, "holds_transfers")
        return Placement(True, "local_cheaper")
