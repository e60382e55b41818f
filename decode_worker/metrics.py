"""The decode worker's own metric families, beside those both roles count (engine/worker_shell.py)."""
from __future__ import annotations

from prometheus_client import Counter

from engine.worker_shell import WorkerMetrics


class DecodeMetrics(WorkerMetrics):
    def __init__(self, worker_id: str) -> None:
        super().__init__()
        self._received = Counter("pdserve_kv_transfer_received_bytes",
                                 "KV bytes received from prefill workers", registry=self.registry)
        self._tokens = Counter("pdserve_decode_tokens", "Tokens sampled by this decode worker",
                               registry=self.registry)
        self._recomputed = Counter("pdserve_kv_recomputes",
                                   "Prompts prefilled here because their KV transfer failed "
                                   "(--kv-failure-policy recompute)", registry=self.registry)

    def kv_recomputed(self) -> None:
        self._recomputed.inc()

    def transfer_received(self, nbytes: int) -> None:
        self._received.inc(nbytes)

    def tokens_generated(self, n: int) -> None:
        self._tokens.inc(n)
