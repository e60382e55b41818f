"""Load snapshots that workers report to the router for dispatch, health and metrics."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineStats:
    num_free_blocks: int
    num_total_blocks: int
    num_running: int
    num_waiting: int
    queued_prefill_tokens: int  # prompt tokens scheduled but not yet computed
    # Prefix cache, since the worker started: prompt tokens found cached, and prompt tokens looked up.
    prefix_hit_tokens: int = 0
    prefix_query_tokens: int = 0

    @property
    def prefix_hit_ratio(self) -> float:
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0

    @property
    def kv_usage_ratio(self) -> float:
        return 1.0 - self.num_free_blocks / max(1, self.num_total_blocks)


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    role: str  # "prefill" | "decode"
    state: str  # "starting" | "ready" | "failed"
    stats: EngineStats
