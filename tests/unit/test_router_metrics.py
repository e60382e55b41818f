"""Router metrics: /metrics serves router families and every worker's families, merged and labelled."""

from __future__ import annotations

import asyncio
import urllib.request

import pytest
from fakes import FakeDecodeClient, fake_cluster, run, serve_router
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proto.api import pb
from router.metrics import RouterMetrics, WorkerMetricsCollector, WorkerMetricsSource, start_metrics_server

pytestmark = pytest.mark.timeout(60)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Parse an exposition (fails on malformed or duplicate families) into {(name, labels): value}."""
    out = {}
    names = []
    for fam in text_string_to_metric_families(text):
        names.append(fam.name)
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    assert len(names) == len(set(names)), "a metric family is exposed twice"
    return out


def test_metrics_endpoint_exposes_router_and_worker_families() -> None:
    async def body() -> str:
        prefill, decode = fake_cluster()
        async with serve_router(prefill, decode, metrics_port=0) as h:
            async for _ in h.stub.Generate(
                pb.GenerateRequest(text="hello", sampling=pb.SamplingOptions(max_tokens=3))
            ):
                pass
            await h.server.pool.refresh()
            await h.server._after_refresh()
            url = f"http://127.0.0.1:{h.server.metrics_port}/metrics"
            # The scrape runs on the HTTP server's thread and hops onto this loop for the workers' texts.
            return await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())

    got = samples(run(body()))
    lab = lambda **kw: frozenset(kw.items())  # noqa: E731
    assert got[("pdserve_requests_total", lab(outcome="length", api="grpc"))] == 1
    assert got[("pdserve_prompt_tokens_total", lab(api="grpc"))] == 5
    assert got[("pdserve_generation_tokens_total", lab(api="grpc"))] == 3
    assert got[("pdserve_time_to_first_token_seconds_count", lab(api="grpc"))] == 1
    assert got[("pdserve_time_per_output_token_seconds_count", lab(api="grpc"))] == 1
    assert got[("pdserve_e2e_request_latency_seconds_count", lab(api="grpc"))] == 1
    assert got[("pdserve_queue_depth", lab(role="router", worker="router"))] == 0
    assert got[("pdserve_queue_wait_seconds_count", lab())] == 1
    assert got[("pdserve_kv_cache_usage_ratio", lab(role="decode", worker="decode-0"))] == 0.0
    # Worker families, labelled with the worker they came from.
    assert got[("pdserve_kv_transfer_bytes_total", lab(dtype="int8", worker="prefill-0"))] == 5 * 1024
    assert got[("pdserve_kv_transfer_seconds_count", lab(worker="prefill-0"))] == 1
    assert got[("pdserve_spec_draft_tokens_total", lab(worker="decode-0"))] == 6
    assert got[("pdserve_spec_accepted_tokens_total", lab(worker="decode-0"))] == 3


def test_worker_families_merge_across_workers_and_never_shadow_router_families() -> None:
    texts = {
        "w1": "# TYPE pdserve_spec_draft_tokens_total counter\npdserve_spec_draft_tokens_total 4\n"
        '# TYPE pdserve_requests_total counter\npdserve_requests_total{outcome="stop"} 99\n',
        "w2": "# TYPE pdserve_spec_draft_tokens_total counter\npdserve_spec_draft_tokens_total 6\n"
        '# TYPE custom_gauge gauge\ncustom_gauge{worker="own-id"} 1\n',
        "w3": "this is {not an exposition",
    }
    metrics = RouterMetrics()
    metrics.requests.labels(outcome="stop", api="grpc").inc()
    metrics.registry.register(WorkerMetricsCollector(lambda: texts, skip_names=metrics._own_names))
    got = samples(generate_latest(metrics.registry).decode())
    lab = lambda **kw: frozenset(kw.items())  # noqa: E731
    assert got[("pdserve_spec_draft_tokens_total", lab(worker="w1"))] == 4
    assert got[("pdserve_spec_draft_tokens_total", lab(worker="w2"))] == 6
    assert got[("custom_gauge", lab(worker="own-id"))] == 1  # a worker's own label is kept
    # the router's own count, not w1's 99:
    assert got[("pdserve_requests_total", lab(outcome="stop", api="grpc"))] == 1


def test_worker_whose_metrics_fail_is_left_out_of_the_scrape() -> None:
    class Broken(FakeDecodeClient):
        async def metrics_text(self) -> str:
            raise ConnectionError("worker gone")

    async def body() -> dict[str, str]:
        source = WorkerMetricsSource([FakeDecodeClient("ok"), Broken("broken")], timeout_s=1.0)
        return await source.fetch_async()

    texts = run(body())
    assert list(texts) == ["ok"]
    assert "pdserve_spec_draft_tokens_total" in texts["ok"]


def test_time_per_output_token_is_the_mean_gap_after_the_first_token() -> None:
    m = RouterMetrics()
    m.observe_request("length", api="http", prompt_tokens=10, completion_tokens=5, ttft_s=0.2, e2e_s=1.0)
    m.observe_request("abort", api="http", prompt_tokens=3, completion_tokens=0, ttft_s=None, e2e_s=None)
    got = samples(generate_latest(m.registry).decode())
    http = frozenset({("api", "http")})
    assert got[("pdserve_time_per_output_token_seconds_sum", http)] == pytest.approx(0.2)
    assert got[("pdserve_time_to_first_token_seconds_count", http)] == 1
    assert got[("pdserve_prompt_tokens_total", http)] == 13
    assert got[("pdserve_requests_total", http | {("outcome", "abort")})] == 1


def test_start_metrics_server_returns_the_running_endpoint_instead_of_binding_twice() -> None:
    async def body() -> None:
        prefill, decode = fake_cluster()
        async with serve_router(prefill, decode, metrics_port=0) as h:
            port = h.server.metrics_port
            assert port
            assert start_metrics_server(h.server, port).server_port == port
            with pytest.raises(RuntimeError, match=f"already served on port {port}"):
                start_metrics_server(h.server, port + 1 if port < 65535 else port - 1)

    run(body())


def test_fault_counters_are_one_call_each_and_the_router_queue_depth_is_read_at_scrape() -> None:
    m = RouterMetrics()
    depth = [3]
    m.track_queue_depth(lambda: depth[0])
    m.count_rejected("queue_full")
    m.count_rejected("queue_full")
    m.count_rejected("deadline")
    m.worker_restarted("decode")
    m.request_migrated()
    m.observe_queue_wait(0.3)
    depth[0] = 7
    got = samples(generate_latest(m.registry).decode())
    lab = lambda **kw: frozenset(kw.items())  # noqa: E731
    assert got[("pdserve_queue_depth", lab(role="router", worker="router"))] == 7
    assert got[("pdserve_requests_rejected_total", lab(reason="queue_full"))] == 2
    assert got[("pdserve_requests_rejected_total", lab(reason="deadline"))] == 1
    assert got[("pdserve_worker_restarts_total", lab(role="decode"))] == 1
    assert got[("pdserve_request_migrations_total", lab())] == 1
    assert got[("pdserve_queue_wait_seconds_bucket", lab(le="0.5"))] == 1
