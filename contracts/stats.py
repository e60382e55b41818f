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
    # Sequence slots (EngineConfig.max_num_seqs); num_running counts the taken ones. 0 = not reported.
    max_num_seqs: int = 0
    tp_comm_bytes: int = 0  # bytes this worker's rank 0 sent in tensor-parallel collectives (0 at TP=1)

    @property
    def kv_usage_ratio(self) -> float:
        return 1.0 - self.num_free_blocks / max(1, self.num_total_blocks)

    @property
    def num_free_seqs(self) -> int | None:
        """Sequence slots still free, or None if the worker reports no cap."""
        return max(0, self.max_num_seqs - self.num_running) if self.max_num_seqs else None


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    role: str  # "prefill" | "decode"
    state: str  # "starting" | "ready" | "failed"
    stats: EngineStats
