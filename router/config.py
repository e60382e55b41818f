"""Frozen router settings."""

from __future__ import annotations

from dataclasses import dataclass

from contracts.config_checks import require_at_least, require_positive
from contracts.transfer import KV_FAILURE_POLICIES


@dataclass(frozen=True)
class RouterConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0 = pick a free port (RouterServer.port tells which)
    queue_capacity: int = 256  # requests waiting for a decode worker with room; beyond -> RESOURCE_EXHAUSTED
    # Requests dispatched to workers at once, on top of the bound the decode workers' reported sequence slots
    # (max_num_seqs) set; None = that bound alone.
    max_inflight: int | None = None
    queue_retry_after_s: float = 1.0  # the retry hint sent with a full-queue RESOURCE_EXHAUSTED
    dispatch_policy: str = "least_loaded"
    default_max_tokens: int = 64
    request_timeout_s: float = 300.0  # upper bound on a request's life; a client deadline can only shorten it
    # Conditional disaggregation (router/placement.py): "cost" decides per request from measured costs;
    # "threshold" prefills prompts of at most local_prefill_max_tokens tokens on the decode worker.
    prefill_placement: str = "cost"
    local_prefill_max_tokens: int = 0
    local_prefill_budget_tokens: int = 512  # "cost": longer prompts are never prefilled on a decode worker
    # "cost": the TTFT objective; a local prompt must not hold a transfer in flight past it. None = the cost
    # policy weighs only the total delay (its own first token against what it adds to the others').
    placement_ttft_slo_s: float | None = None
    max_model_len: int | None = None  # None = the model's context length
    metrics_port: int | None = 9400  # None = no /metrics endpoint; 0 = pick a free port
    # The OpenAI-compatible HTTP door on `host`: None = off (`pdserve up` serves it on 8000); 0 = a free port.
    http_port: int | None = None
    served_model_name: str | None = None  # the HTTP door's model id; None = ModelInfo.model_name
    worker_refresh_s: float = 0.1  # how often each worker's info (state, load) is pulled: GetServerInfo's age
    worker_call_timeout_s: float = 5.0  # bound on control calls (info, abort, metrics_text) to one worker
    # A worker whose info() has not answered for this long is marked failed; one slow answer is not a failure.
    worker_heartbeat_timeout_s: float = 15.0
    max_request_id_len: int = 128
    # Bad input and security on the public doors (gRPC and HTTP); see docs/operations.md "Security".
    max_request_bytes: int = 4 * 1024 * 1024  # larger requests: RESOURCE_EXHAUSTED (gRPC) or 413 (HTTP)
    max_stop_strings: int = 32  # stop strings per request; each at most max_stop_chars characters
    max_stop_chars: int = 256
    max_stop_token_ids: int = 256
    metrics_host: str = "127.0.0.1"  # /metrics binds loopback unless told otherwise, whatever `host` is
    tls_cert_file: str | None = None  # PEM chain; with tls_key_file: both doors speak TLS
    tls_key_file: str | None = None
    auth_token_file: str | None = None  # one line; gRPC and HTTP then need "authorization: Bearer <token>"
    # A request whose decode worker dies moves to another (or the restarted) one at most this many times,
    # re-prefilled from prompt + the tokens already streamed; 0 = it fails with UNAVAILABLE.
    migration_limit: int = 1
    # A new request that finds no decode worker ready while the pool has one (starting, or restarting after a
    # death: Ray brings it back) waits this long for it before UNAVAILABLE; 0 = fail at once.
    decode_ready_wait_s: float = 30.0
    # A prefill worker that fails a request: "recompute" prefills it on its decode worker, "fail" ends it.
    kv_failure_policy: str = "recompute"

    def __post_init__(self) -> None:
        require_at_least(self, 0, "queue_capacity", "max_request_id_len", "max_stop_strings",
                         "max_stop_token_ids", "migration_limit", "local_prefill_budget_tokens",
                         "local_prefill_max_tokens", "decode_ready_wait_s")
        if self.max_inflight is not None and self.max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1 or None, got {self.max_inflight}")
        require_at_least(self, 1, "default_max_tokens", "max_request_bytes", "max_stop_chars")
        require_positive(self, "request_timeout_s", "worker_refresh_s", "worker_call_timeout_s",
                         "worker_heartbeat_timeout_s", "queue_retry_after_s")
        if self.placement_ttft_slo_s is not None and self.placement_ttft_slo_s <= 0:
            raise ValueError(f"placement_ttft_slo_s must be > 0 or None, got {self.placement_ttft_slo_s}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        for name in ("metrics_port", "http_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                raise ValueError(f"{name} must be in [0, 65535] or None, got {value}")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: give both or neither")
        if self.kv_failure_policy not in KV_FAILURE_POLICIES:
            raise ValueError(f"kv_failure_policy must be one of {KV_FAILURE_POLICIES}, "
                             f"got {self.kv_failure_policy!r}")
        if self.served_model_name is not None and not self.served_model_name:
            raise ValueError("served_model_name must not be empty (None = the model's own name)")
