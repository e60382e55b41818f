"""The prefill worker's own metric families, beside those both roles count (engine/worker_shell.py)."""
from __future__ import annotations

from prometheus_client import Counter, Histogram

from engine.worker_shell import WorkerMetrics

_TRANSFER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class PrefillMetrics(WorkerMetrics):
    def __init__(self, worker_id: str, kv_dtype: str) -> None:
        super().__init__()
        self._dtype = kv_dtype
        self._bytes = Counter("pdserve_kv_transfer_bytes", "KV bytes sent to decode workers, by cache dtype",
                              ["dtype"], registry=self.registry)
        self._seconds = Histogram("pdserve_kv_transfer_seconds",
                                  "First layer handed to the sender -> all sent",
                                  buckets=_TRANSFER_BUCKETS, registry=self.registry)
        self._exposed = Histogram("pdserve_kv_transfer_exposed_seconds",
                                  "Transfer time left after prefill compute ended "
                                  "(not hidden behind compute)",
                                  buckets=_TRANSFER_BUCKETS, registry=self.registry)
        self._prompt_tokens = Counter("pdserve_prefill_tokens", "Prompt tokens prefilled by this worker",
                                      registry=self.registry)

    def transfer_done(self, nbytes: int, seconds: float, exposed_seconds: float) -> None:
        self._bytes.labels(dtype=self._dtype).inc(nbytes)
        self._seconds.observe(seconds)
        self._exposed.observe(exposed_seconds)

    def prefill_done(self, num_tokens: int) -> None:
        self._prompt_tokens.inc(num_tokens)
