"""The prefill worker's own Prometheus registry; the router re-exposes it at scrape time (metrics_text)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

_TRANSFER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class PrefillMetrics:
    def __init__(self, worker_id: str, kv_dtype: str) -> None:
        self._dtype = kv_dtype
        self.registry = CollectorRegistry()
        self._bytes = Counter("pdserve_kv_transfer_bytes", "KV bytes sent to decode workers, by cache dtype",
                              ["dtype"], registry=self.registry)
        self._seconds = Histogram("pdserve_kv_transfer_seconds",
                                  "First layer handed to the sender -> all sent",
                                  buckets=_TRANSFER_BUCKETS, registry=self.registry)
        self._exposed = Histogram("pdserve_kv_transfer_exposed_seconds",
                                  "Transfer time left after prefill compute ended "
                                  "(not hidden behind compute)",
                                  buckets=_TRANSFER_BUCKETS, registry=self.registry)
        self._failures = Counter("pdserve_kv_transfer_failures", "KV transfers that failed, by reason",
                                 ["reason"], registry=self.registry)
        self._prompt_tokens = Counter("pdserve_prefill_tokens", "Prompt tokens prefilled by this worker",
                                      registry=self.registry)

    def transfer_done(self, nbytes: int, seconds: float, exposed_seconds: float) -> None:
        self._bytes.labels(dtype=self._dtype).inc(nbytes)
        self._seconds.observe(seconds)
        self._exposed.observe(exposed_seconds)

    def transfer_failed(self, reason: str) -> None:
        self._failures.labels(reason=reason).inc()

    def prefill_done(self, num_tokens: int) -> None:
        self._prompt_tokens.inc(num_tokens)

    def exposition(self) -> str:
        return generate_latest(self.registry).decode()
