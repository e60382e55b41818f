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
    tp_comm_bytes: int = 0  # bytes this worker's rank 0 sent in tensor-parallel collectives (0 at TP=1)

    @property
    def kv_usage_ratio(self) -> float:
        return 1.0 - self.num_free_blocks / max(1, self.num_total_blocks)


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    role: str  # "prefill" | "decode"
    state: str  # "starting" | "ready" | "failed"
    stats: EngineStats
