"""A real Prometheus scrapes the running cluster and answers a PromQL query for p99 time to first token."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest

from proto.api import pb, pb_grpc

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

APT_TIMEOUT_S = 90  # Debian's package installs in ~30 s here; a slow mirror is a skip, not a stuck suite
P99_TTFT = "histogram_quantile(0.99, sum by (le) (rate(pdserve_time_to_first_token_seconds_bucket[1m])))"


def _prometheus_binary() -> str:
    """The installed `prometheus`, or Debian's package installed now where apt works (CI runs as root)."""
    found = shutil.which("prometheus")
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("prometheus is not installed, and installing Debian's package needs apt-get as root")
    try:
        done = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "prometheus"],
                              capture_output=True, text=True, timeout=APT_TIMEOUT_S,
                              env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    except subprocess.TimeoutExpired:
        pytest.skip(f"apt-get install prometheus took longer than {APT_TIMEOUT_S} s")
    found = shutil.which("prometheus")
    if done.returncode != 0 or not found:
        pytest.skip(f"apt-get install prometheus failed ({done.returncode}): {done.stderr.strip()[-300:]}")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def _query(base: str, promql: str) -> list[dict]:
    answer = _get_json(f"{base}/api/v1/query?{urllib.parse.urlencode({'query': promql})}")
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def _poll(what: str, fn, timeout_s: float, log: Path):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            result = fn()
        except OSError:  # not listening yet
            result = None
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; prometheus log:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def prometheus(cluster, tmp_path_factory: pytest.TempPathFactory):
    binary = _prometheus_binary()
    workdir = tmp_path_factory.mktemp("prometheus")
    target = urllib.parse.urlsplit(cluster.metrics_url)
    config = workdir / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: pdserve\n"
        f"    metrics_path: {target.path}\n"
        f"    static_configs:\n      - targets: ['{target.netloc}']\n")
    port = _free_port()
    log = workdir / "prometheus.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        ready = lambda: urllib.request.urlopen(f"{base}/-/ready", timeout=2).status == 200  # noqa: E731
        _poll("prometheus to be ready", ready, 60, log)
        _poll("a first successful scrape", lambda: _query(base, 'up{job="pdserve"} == 1'), 60, log)
        yield base, log
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_prometheus_scrapes_the_cluster_and_answers_ttft_p99(cluster, prometheus):
    base, log = prometheus
    with grpc.insecure_channel(cluster.address) as channel:
        stub = pb_grpc.PDServeStub(channel)
        for i in range(4):  # after the first scrape, so rate() sees the counts rise
            request = pb.GenerateRequest(text=f"Count to {i + 3}.", sampling=pb.SamplingOptions(max_tokens=4))
            finals = [r for r in stub.Generate(request, timeout=120) if r.HasField("final")]
            assert finals and finals[0].final.usage.completion_tokens > 0

    # NaN until two scrapes bracket the requests (rate() of an unchanged count); then a number.
    answered = lambda: [r for r in _query(base, P99_TTFT) if r["value"][1] != "NaN"]  # noqa: E731
    result = _poll("a p99 TTFT from PromQL", answered, 60, log)
    p99 = float(result[0]["value"][1])
    assert 0 < p99 < 120, result  # seconds: a real quantile, not NaN or +Inf
    depth = _query(base, 'pdserve_queue_depth{role="router"}')
    assert depth and float(depth[0]["value"][1]) == 0  # the admission queue drained
