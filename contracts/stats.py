"""Load snapshots that workers report to the router for dispatch, health and metrics."""
from __future__ import annotations

from dataclasses import dataclass, field


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
    # Prefix cache, since the worker started: prompt tokens found cached, and prompt tokens looked up.
    prefix_hit_tokens: int = 0
    prefix_query_tokens: int = 0
    # Decode role, for conditional placement (router/placement.py): reservations whose KV is still in flight
    # (num_running counts them too); measured seconds per prompt token of a local prefill on an idle worker
    # (prefill-only steps) and beside its decode batch (paced by the split-fused credit). 0.0 = not measured.
    num_awaiting_kv: int = 0
    prefill_s_per_token: float = 0.0
    fused_prefill_s_per_token: float = 0.0

    @property
    def prefix_hit_ratio(self) -> float:
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0

    @property
    def kv_usage_ratio(self) -> float:
        return 1.0 - self.num_free_blocks / max(1, self.num_total_blocks)

    @property
    def num_free_seqs(self) -> int | None:
        """Sequence slots still free, or None if the worker reports no cap."""
        return max(0, self.max_num_seqs - self.num_running) if self.max_num_seqs else None


@dataclass(frozen=True)
class TPRankInfo:
    """One tensor-parallel rank of a worker: device, process id, the global kv heads its cache holds."""

    rank: int
    device: str
    pid: int
    kv_heads: tuple[int, ...]


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    role: str  # "prefill" | "decode"
    state: str  # "starting" | "ready" | "failed"
    stats: EngineStats
    # Prefix-aware dispatch: the worker's KV block size and the chain hashes (contracts/prefix_hash.py) of
    # every block in its prefix cache, as of this snapshot (at most num_kv_blocks of them, 8 bytes each).
    block_size: int = 0
    cached_blocks: frozenset[int] = field(default_factory=frozenset)
    tp_ranks: tuple[TPRankInfo, ...] = ()  # one entry per rank (rank 0 first); empty: not reported

    def cached_prefix_blocks(self, block_hashes: list[int]) -> int:
        """How many leading blocks of a prompt (its chain hashes) this worker holds in its prefix cache."""
        n = 0
        for h in block_hashes:
            if h not in self.cached_blocks:
                break
            n += 1
        return n
