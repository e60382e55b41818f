"""Router metrics in a router-owned registry plus a collector re-exposing every worker's metrics at scrape."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from contracts.stats import WorkerInfo
from router.clients import WorkerClient

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
# Around issue 14's 1 ms goal for the router's share of a streamed token, fine enough to read a p99 off.
TOKEN_OVERHEAD_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2e-4, 3e-4, 5e-4, 7.5e-4, 0.001, 0.0015, 0.0025, 0.005,
                           0.01, 0.025, 0.05, 0.1)
_QUEUE_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ROUTER_ROLE = "router"  # queue_depth{role="router", worker="router"} is the admission queue


class WorkerMetricsSource:
    """Pulls `metrics_text()` from every worker. Scrapes arrive on the HTTP server's thread while the clients
    live on the router's event loop, so `fetch()` hops onto that loop and waits (bounded) for the answers."""

    def __init__(self, clients: Sequence[WorkerClient], timeout_s: float = 2.0) -> None:
        self._clients = list(clients)
        self._timeout_s = timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last: dict[str, str] = {}

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def set_clients(self, clients: Sequence[WorkerClient]) -> None:
        """The workers changed (`pdserve scale`): scrape these from now on."""
        self._clients = list(clients)

    async def fetch_async(self) -> dict[str, str]:
        """worker_id -> exposition text; a worker that fails or times out is left out of this scrape."""

        async def text(client: WorkerClient) -> str:
            return await asyncio.wait_for(client.metrics_text(), self._timeout_s)

        texts = await asyncio.gather(*(text(c) for c in self._clients), return_exceptions=True)
        out: dict[str, str] = {}
        for client, text in zip(self._clients, texts, strict=True):
            if isinstance(text, str):
                out[client.worker_id] = text
            elif isinstance(text, BaseException) and not isinstance(text, Exception):
                raise text  # cancellation and friends
            else:
                log.debug("metrics_text() of %s failed: %r", client.worker_id, text)
        self._last = out
        return out

    def fetch(self) -> dict[str, str]:
        """Blocking fetch for a foreign thread; on the loop's own thread (or with no loop) the last result."""
        loop = self._loop
        if loop is None or loop.is_closed() or not loop.is_running():
            return self._last
        try:
            if asyncio.get_running_loop() is loop:
                return self._last  # blocking here would deadlock the loop we are waiting on
        except RuntimeError:
            pass  # no loop in this thread: the normal scrape case
        future = asyncio.run_coroutine_threadsafe(self.fetch_async(), loop)
        try:
            return future.result(self._timeout_s + 1.0)
        except Exception as e:  # the scrape still serves router metrics when workers are slow
            future.cancel()
            log.warning("worker metrics fetch failed: %s: %s", type(e).__name__, e)
            return self._last


class WorkerMetricsCollector(Collector):
    """Parses each worker's exposition and yields its families merged across workers, each sample labelled
    with `worker` (unless the worker set it). Families the router owns are skipped to keep names unique."""

    def __init__(self, fetch: Callable[[], dict[str, str]], skip_names: Iterable[str] = ()) -> None:
        self._fetch = fetch
        self._skip = set(skip_names)

    def describe(self) -> list[Metric]:
        return []  # unknown until scraped; also keeps registration from triggering a fetch

    def collect(self) -> Iterable[Metric]:
        merged: dict[str, Metric] = {}
        for worker_id, text in sorted(self._fetch().items()):
            try:
                families = list(text_string_to_metric_families(text))
            except Exception as e:  # one malformed worker must not break the whole scrape
                log.warning("unparsable metrics from %s: %s", worker_id, e)
                continue
            for fam in families:
                if fam.name in self._skip:
                    continue
                out = merged.get(fam.name)
                if out is None:
                    out = merged[fam.name] = Metric(fam.name, fam.documentation, fam.type)
                elif out.type != fam.type:
                    log.warning(
                        "metric %s is a %s on one worker and a %s on %s; skipped there",
                        fam.name,
                        out.type,
                        fam.type,
                        worker_id,
                    )
                    continue
                for s in fam.samples:
                    labels = s.labels if "worker" in s.labels else {**s.labels, "worker": worker_id}
                    out.add_sample(s.name, labels, s.value, s.timestamp, s.exemplar)
        return list(merged.values())


class RouterMetrics:
    def __init__(self, worker_source: WorkerMetricsSource | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.ttft = Histogram(
            "pdserve_time_to_first_token_seconds",
            "Router receipt to first token sent",
            ["api"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "pdserve_time_per_output_token_seconds",
            "Mean time between output tokens after the first, per request",
            ["api"],
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "pdserve_e2e_request_latency_seconds",
            "Router receipt to final message",
            ["api"],
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "pdserve_requests", "Finished requests by outcome", ["outcome", "api"], registry=r
        )
        self.prompt_tokens = Counter(
            "pdserve_prompt_tokens", "Prompt tokens of dispatched requests", ["api"], registry=r
        )
        self.generation_tokens = Counter(
            "pdserve_generation_tokens", "Tokens streamed to clients", ["api"], registry=r
        )
        self.queue_depth = Gauge(
            "pdserve_queue_depth",
            "Requests waiting (router admission queue or worker)",
            ["role", "worker"],
            registry=r,
        )
        self.kv_usage = Gauge(
            "pdserve_kv_cache_usage_ratio", "Fraction of KV blocks in use", ["role", "worker"], registry=r
        )
        self.queue_wait = Histogram(
            "pdserve_queue_wait_seconds",
            "Router receipt to a decode worker's reservation (time spent in the admission queue)",
            buckets=_QUEUE_WAIT_BUCKETS,
            registry=r,
        )
        self.token_overhead = Histogram(
            "pdserve_router_token_overhead_seconds",
            "Per streamed delta (one decode step's tokens of one stream): its chunk's arrival from the decode"
            " worker's stream to its message handed to the gRPC write (or SSE frame): the router's own share",
            buckets=TOKEN_OVERHEAD_BUCKETS,
            registry=r,
        )
        self.token_write = Histogram(
            "pdserve_router_token_write_seconds",
            "Per streamed delta: its message handed to the gRPC write (or SSE frame) to that write's return",
            buckets=TOKEN_OVERHEAD_BUCKETS,
            registry=r,
        )
        self.rejected = Counter(
            "pdserve_requests_rejected",
            "Requests turned away by admission: queue_full, or deadline (expired while queued)",
            ["reason"],
            registry=r,
        )
        # Hooks for the healing side (launcher supervision, request migration): one call each.
        self.worker_restarts = Counter(
            "pdserve_worker_restarts", "Workers restarted after they died", ["role"], registry=r
        )
        self.request_migrations = Counter(
            "pdserve_request_migrations",
            "In-flight requests moved to another decode worker after theirs died",
            registry=r,
        )
        self.prefill_placements = Counter(
            "pdserve_prefill_placement", "Where prompts were prefilled (local: on the decode worker), why",
            ["where", "reason"], registry=r,
        )
        self._own_names = {
            m.name
            for c in (
                self.ttft,
                self.tpot,
                self.e2e,
                self.requests,
                self.prompt_tokens,
                self.generation_tokens,
                self.queue_depth,
                self.kv_usage,
                self.queue_wait,
                self.token_overhead,
                self.token_write,
                self.rejected,
                self.worker_restarts,
                self.request_migrations,
                self.prefill_placements,
            )
            for m in c.describe()
        }
        self.worker_source = worker_source
        if worker_source is not None:
            r.register(WorkerMetricsCollector(worker_source.fetch, skip_names=self._own_names))
        self._httpd: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def observe_request(
        self,
        outcome: str,
        *,
        api: str,
        prompt_tokens: int,
        completion_tokens: int,
        ttft_s: float | None,
        e2e_s: float | None,
    ) -> None:
        """One request left the router through door `api`; latencies only if it produced tokens."""
        self.requests.labels(outcome=outcome, api=api).inc()
        self.prompt_tokens.labels(api=api).inc(prompt_tokens)
        self.generation_tokens.labels(api=api).inc(completion_tokens)
        if ttft_s is not None:
            self.ttft.labels(api=api).observe(ttft_s)
            if e2e_s is not None and completion_tokens > 1:
                self.tpot.labels(api=api).observe(max(0.0, e2e_s - ttft_s) / (completion_tokens - 1))
        if e2e_s is not None:
            self.e2e.labels(api=api).observe(e2e_s)

    def count_invalid(self, api: str) -> None:
        """A request rejected by validation, before any flow existed."""
        self.requests.labels(outcome="invalid", api=api).inc()

    def observe_queue_wait(self, seconds: float) -> None:
        """A request left the admission queue for a worker (its reservation succeeded)."""
        self.queue_wait.observe(seconds)

    def count_rejected(self, reason: str) -> None:
        self.rejected.labels(reason=reason).inc()

    def worker_restarted(self, role: str) -> None:
        self.worker_restarts.labels(role=role).inc()

    def request_migrated(self) -> None:
        self.request_migrations.inc()

    def track_queue_depth(self, depth: Callable[[], int]) -> None:
        """queue_depth{role="router"} reads the admission queue at scrape time, so it is never stale."""
        self.queue_depth.labels(role=ROUTER_ROLE, worker=ROUTER_ROLE).set_function(depth)

    def update_gauges(self, workers: Iterable[WorkerInfo]) -> None:
        for w in workers:
            self.queue_depth.labels(role=w.role, worker=w.worker_id).set(w.stats.num_waiting)
            if w.stats.num_total_blocks > 0:  # a worker still starting has no cache yet: no ratio, not 100%
                self.kv_usage.labels(role=w.role, worker=w.worker_id).set(w.stats.kv_usage_ratio)

    def start_metrics_server(self, port: int, host: str = "127.0.0.1") -> WSGIServer:
        """Serve GET /metrics from a daemon thread; `.server_port` tells the bound port (useful with port 0).
        Idempotent: asking again for the running endpoint's port (or 0) returns the same server."""
        if self._httpd is not None:
            if port in (0, self._httpd.server_port):
                return self._httpd
            raise RuntimeError(f"metrics already served on port {self._httpd.server_port}, not {port}")
        self._httpd, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return self._httpd

    def stop_metrics_server(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._httpd = self._thread = None


    def prefill_placed(self, where: str, reason: str) -> None:
        self.prefill_placements.labels(where=where, reason=reason).inc()

def start_metrics_server(target: RouterMetrics | Any, port: int, host: str = "127.0.0.1") -> WSGIServer:
    """Serve `target`'s metrics (a RouterMetrics, or anything with a `.metrics` one such as RouterServer) on
    http://host:port/metrics. RouterServer.start() already does this for RouterConfig.metrics_port; calling it
    again for that port returns the running server instead of binding twice."""
    metrics = target if isinstance(target, RouterMetrics) else target.metrics
    return metrics.start_metrics_server(port, host)
