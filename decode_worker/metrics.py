"""The decode worker's own metric families, beside those both roles count (engine/worker_shell.py)."""
from __future__ import annotations

from prometheus_client import Counter, Histogram

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

        self._drafted = Counter("pdserve_spec_draft_tokens", "Draft tokens verified by the target model",
                                registry=self.registry)
        self._accepted = Counter("pdserve_spec_accepted_tokens",
                                 "Draft tokens the target model accepted (emitted as output)",
                                 registry=self.registry)
        self._acceptance = Histogram("pdserve_spec_acceptance_ratio",
                                     "Accepted / drafted tokens of one verify step",
                                     buckets=(0.0, 0.2, 0.4, 0.6, 0.8, 0.999, 1.0), registry=self.registry)

    def verified(self, drafted: int, accepted: int) -> None:
        """One sequence's verify step: `accepted` of its `drafted` tokens were kept."""
        self._drafted.inc(drafted)
        self._accepted.inc(accepted)
        self._acceptance.observe(accepted / drafted)

    def kv_recomputed(self) -> None:
        self._recomputed.inc()

    def transfer_received(self, nbytes: int) -> None:
        self._received.inc(nbytes)

    def tokens_generated(self, n: int) -> None:
        self._tokens.inc(n)
