"""The decode worker's own Prometheus registry; the router re-exposes it at scrape time (metrics_text)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, generate_latest


class DecodeMetrics:
    def __init__(self, worker_id: str) -> None:
        self.registry = CollectorRegistry()
        self._received = Counter("pdserve_kv_transfer_received_bytes",
                                 "KV bytes received from prefill workers", registry=self.registry)
        self._failures = Counter("pdserve_kv_transfer_failures", "KV transfers that failed, by reason",
                                 ["reason"], registry=self.registry)
        self._tokens = Counter("pdserve_decode_tokens", "Tokens sampled by this decode worker",
                               registry=self.registry)

    def transfer_received(self, nbytes: int) -> None:
        self._received.inc(nbytes)

    def transfer_failed(self, reason: str) -> None:
        self._failures.labels(reason=reason).inc()

    def tokens_generated(self, n: int) -> None:
        self._tokens.inc(n)

    def exposition(self) -> str:
        return generate_latest(self.registry).decode()
