"""pdserve bench's runner and CLI against an in-process gRPC server streaming canned tokens at set delays."""
from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import pytest

from bench.serving.client import CANCELLED_AT_STOP, RunLimits, run_load
from bench.serving.report import main as report_main
from bench.serving.run import main as bench_main
from bench.serving.workload import BenchRequest
from proto.api import pb, pb_grpc

TTFT, TPOT = 0.15, 0.04
REJECT_ID = 7  # a prompt starting with this id is refused, like a full admission queue


@dataclass
class FakePDServe(pb_grpc.PDServeServicer):
    """Sleeps TTFT, streams one token, then one token every TPOT; counts streams still open."""
    open_streams: int = 0
    started: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext):
        if request.token_ids.ids and request.token_ids.ids[0] == REJECT_ID:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
        with self.lock:
            self.open_streams += 1
            self.started += 1
        try:
            n = request.sampling.max_tokens
            for i in range(n):
                time.sleep(TTFT if i == 0 else TPOT)
                yield pb.GenerateResponse(delta=pb.TokenDelta(token_ids=[100 + i], text="x"))
            yield pb.GenerateResponse(final=pb.FinalResult(
                finish_reason=pb.FINISH_REASON_LENGTH,
                usage=pb.Usage(prompt_tokens=len(request.token_ids.ids), completion_tokens=n)))
        finally:  # also runs when the client cancels: grpc closes the generator at its next yield
            with self.lock:
                self.open_streams -= 1


@dataclass(frozen=True)
class FakeServer:
    address: str
    servicer: FakePDServe


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeServer]:
    """A thread-pool server (its own threads, no event loop), so tests and the CLI can call asyncio.run."""
    servicer = FakePDServe()
    server = grpc.server(ThreadPoolExecutor(max_workers=32))
    pb_grpc.add_PDServeServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield FakeServer(f"127.0.0.1:{port}", servicer)
    server.stop(None).wait(10)


def _wait_closed(servicer: FakePDServe, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while servicer.open_streams and time.monotonic() < deadline:
        time.sleep(0.02)
    return servicer.open_streams


def test_runner_measures_the_servers_ttft_and_tpot(fake_server: FakeServer) -> None:
    requests = [BenchRequest(max_tokens=6, prompt_ids=(1, 2, 3))] * 4
    result = asyncio.run(run_load(fake_server.address, [0.0, 0.05, 0.1, 0.15], requests,
                                  RunLimits(max_seconds=10, progress=False)))
    assert result.not_sent == 0 and len(result.records) == 4
    for r in result.records:
        assert r.status == "OK" and r.output_tokens == 6 and r.prompt_tokens == 3
        # asyncio.sleep never wakes early; loopback gRPC on a busy 2-core box adds a few ms, not tens.
        assert TTFT - 0.005 <= r.ttft <= TTFT + 0.1
        assert TPOT - 0.005 <= r.tpot <= TPOT + 0.03
        assert r.e2e == pytest.approx(TTFT + 5 * TPOT, abs=0.15)
    sent = [r.sent_at for r in result.records]
    assert sent == pytest.approx([0.0, 0.05, 0.1, 0.15], abs=0.04)  # open loop: sent on schedule


def test_runner_records_refusals_by_status_code(fake_server: FakeServer) -> None:
    requests = [BenchRequest(max_tokens=2, prompt_ids=(REJECT_ID, 1)),
                BenchRequest(max_tokens=2, prompt_ids=(1,))]
    result = asyncio.run(run_load(fake_server.address, [0.0, 0.0], requests,
                                  RunLimits(max_seconds=10, warmup=1, progress=False)))
    by_index = {r.index: r for r in result.records}
    assert by_index[0].status == "RESOURCE_EXHAUSTED" and by_index[0].ttft is None and by_index[0].warmup
    assert by_index[1].status == "OK" and not by_index[1].warmup


def test_hard_stop_sends_nothing_more_and_cancels_open_streams(fake_server: FakeServer) -> None:
    before = fake_server.servicer.started
    requests = [BenchRequest(max_tokens=200, prompt_ids=(1,))] * 100  # 8 s each at TPOT
    start = time.perf_counter()
    result = asyncio.run(run_load(fake_server.address, [i * 0.1 for i in range(100)], requests,
                                  RunLimits(max_seconds=1.0, progress=False)))
    elapsed = time.perf_counter() - start
    assert elapsed < 2.5
    assert 8 <= len(result.records) <= 12 and result.not_sent == 100 - len(result.records)
    assert all(r.status == CANCELLED_AT_STOP for r in result.records)
    assert max(r.output_tokens for r in result.records) > 0  # what streamed before the stop is kept
    # Every request that streamed reached the server; one sent in the stop's instant may be cancelled before
    # the server's handler starts (its record says CANCELLED_AT_STOP with nothing streamed).
    streamed = sum(r.output_tokens > 0 for r in result.records)
    assert streamed <= fake_server.servicer.started - before <= len(result.records)
    assert _wait_closed(fake_server.servicer) == 0  # the server saw every cancellation


def test_requests_bound_ends_the_run_when_the_last_reply_is_in(fake_server: FakeServer) -> None:
    requests = [BenchRequest(max_tokens=1, prompt_ids=(1,))] * 3
    start = time.perf_counter()
    result = asyncio.run(run_load(fake_server.address, [0.0] * 3, requests, RunLimits(max_seconds=30,
                                                                                     progress=False)))
    assert time.perf_counter() - start < 2.0 and len(result.records) == 3
    assert all(r.tpot is None and r.max_itl is None for r in result.records)  # one token: no gaps


def test_runner_refuses_a_remote_target_before_connecting() -> None:
    with pytest.raises(ValueError, match="only targets this machine"):
        asyncio.run(run_load("10.1.2.3:50051", [0.0], [BenchRequest(max_tokens=1, prompt_ids=(1,))],
                             RunLimits(max_seconds=1, progress=False)))


def test_cli_writes_json_and_plots_for_a_single_run(fake_server: FakeServer, tmp_path, capsys) -> None:
    out = tmp_path / "run.json"
    rc = bench_main(["--address", fake_server.address, "--rate", "20", "--num-requests", "6", "--warmup", "1",
                     "--output-len", "fixed:3", "--prompt-len", "uniform:4:8", "--slo-ttft", "0.5",
                     "--slo-tpot", "0.2", "--json", str(out), "--plots", str(tmp_path / "png"),
                     "--no-progress", "--label", "fake"])
    assert rc == 0
    result = json.loads(out.read_text())
    run = result["run"]
    assert result["label"] == "fake" and result["rate"] == 20.0 and len(result["records"]) == 6
    assert run["requests"] == 5 and run["ok"] == 5 and run["statuses"] == {"OK": 5}
    assert run["slo_attainment"] == 1.0 and run["output_token_throughput"] > 0
    assert TTFT - 0.005 <= run["ttft_s"]["p50"] <= TTFT + 0.1
    assert (tmp_path / "png" / "latency_vs_rate.png").stat().st_size > 0
    assert "ttft" in capsys.readouterr().out


def test_cli_sweep_reports_goodput_and_every_probe(fake_server: FakeServer, tmp_path) -> None:
    out = tmp_path / "sweep.json"
    rc = bench_main(["--address", fake_server.address, "--num-requests", "3", "--output-len", "fixed:2",
                     "--slo-ttft", "1", "--slo-tpot", "1", "--sweep", "5:50", "--json", str(out),
                     "--plots", str(tmp_path), "--no-progress"])
    assert rc == 0
    sweep = json.loads(out.read_text())["sweep"]
    assert sweep["bound"] == "at_high" and sweep["goodput_rps"] == 50.0  # the fake never slows down
    assert [p["rate"] for p in sweep["probes"]] == [5.0, 50.0] and sweep["probes"][0]["attainment"] == 1.0
    assert (tmp_path / "goodput.png").stat().st_size > 0
    other = {**json.loads(out.read_text()), "label": "other"}
    (tmp_path / "other.json").write_text(json.dumps(other))
    combined = tmp_path / "combined"
    assert report_main([str(out), str(tmp_path / "other.json"), "--plots", str(combined)]) == 0
    assert (combined / "goodput.png").stat().st_size > 0 and (combined / "latency_vs_rate.png").exists()


def test_plots_without_matplotlib_say_how_to_get_them(fake_server: FakeServer, tmp_path, monkeypatch,
                                                      capsys) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    rc = bench_main(["--address", fake_server.address, "--num-requests", "1", "--output-len", "fixed:1",
                     "--json", str(tmp_path / "r.json"), "--plots", str(tmp_path), "--no-progress"])
    assert rc == 1 and (tmp_path / "r.json").exists()  # the measurements are kept
    assert "install matplotlib for plots" in capsys.readouterr().err


def test_cli_refuses_remote_targets_and_half_an_slo(capsys) -> None:
    assert bench_main(["--address", "192.168.0.10:50051", "--no-progress"]) == 2
    assert "only targets this machine" in capsys.readouterr().err
    assert bench_main(["--address", "127.0.0.1:1", "--slo-ttft", "1", "--no-progress"]) == 2
    assert "--slo-tpot" in capsys.readouterr().err
