"""Conditional placement in the simulator: the router's own cost policy, fed the simulated workers' state."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from contracts.stats import EngineStats, WorkerInfo
from engine.step_cost import StepCostModel, with_placement_costs
from prefill_worker.api import PrefillResult
from router.config import RouterConfig
from router.placement import Placement, make_placement


class SimWorker(Protocol):
    """What the policy reads of a simulated worker (sim_events._Worker has it)."""
    index: int
    queued_tokens: int
    active: int
    awaiting: int
    step_cost: StepCostModel | None

    def waiting_local(self) -> tuple[int, int]: ...


class SimPlacement:
    """router/placement.py's `cost` policy deciding for the simulated router. It sees each worker's state
    exactly (the real router's is up to one refresh old, corrected by its own reservations) and learns from
    every remote prefill as the real one does: compute seconds, exposed transfer, the round trip."""

    def __init__(self, config: RouterConfig | None = None) -> None:
        self.policy = make_placement(config or RouterConfig(prefill_placement="cost"))

    def warm(self, prompt_tokens: int, prefill_s: float, exposed_s: float, overhead_s: float) -> None:
        """Feed the policy the remote prefills a cluster that already served earlier probes has measured
        (the harness bisects on one cluster; each simulated probe starts cold)."""
        for _ in range(getattr(self.policy, "warmup", 0)):
            self.observe(prompt_tokens, prefill_s, exposed_s, prefill_s + exposed_s + overhead_s)

    def observe(self, prompt_tokens: int, prefill_s: float, exposed_s: float, round_trip_s: float) -> None:
        self.policy.observe(prompt_tokens, PrefillResult("", 0, 0.0, prefill_s, exposed_s), round_trip_s)

    def place(self, prompt_tokens: int, prefillers: Sequence[SimWorker],
              decoders: Sequence[SimWorker]) -> Placement:
        return self.policy.place(prompt_tokens, [_info("prefill", w) for w in prefillers],
                                 [_info("decode", w) for w in decoders])


def _info(role: str, w: SimWorker) -> WorkerInfo:
    started, waiting = w.waiting_local()
    stats = EngineStats(num_free_blocks=0, num_total_blocks=0,
                        num_running=w.active + w.awaiting + started, num_waiting=waiting,
                        queued_prefill_tokens=w.queued_tokens)
    if role == "decode":
        stats = with_placement_costs(stats, w.step_cost, w.awaiting)
    return WorkerInfo(f"{role}-{w.index}", role, "ready", stats)
