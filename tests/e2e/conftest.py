"""Starts the real cluster once per session: `pdserve up`, local Ray, 1 prefill + 1 decode, on loopback."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
KV_BLOCKS = 256


@dataclass(frozen=True)
class Cluster:
    address: str
    metrics_url: str
    http_url: str | None  # the OpenAI-compatible API's base URL, ".../v1"; None with --http-port 0
    admin_address: str  # where `pdserve scale` reaches the launcher
    process: subprocess.Popen  # `pdserve up`: the router runs in this process, the session's leader
    log_path: Path


def _wait_serving(address: str, proc: subprocess.Popen, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"pdserve up exited with {proc.returncode}:\n"
                                   f"{log_path.read_text()[-4000:]}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise TimeoutError(f"cluster not SERVING after {timeout} s:\n{log_path.read_text()[-4000:]}")


@contextlib.contextmanager
def running_cluster(workdir: Path, *flags: str) -> Iterator[Cluster]:
    """`pdserve up` with `flags` on free ports, until SERVING; on exit stopped like Ctrl-C and checked.
    A flag given in `flags` overrides the default below (argparse keeps the last)."""
    log_path, ready_path = workdir / "pdserve-up.log", workdir / "ready.json"
    # Port 0: the servers bind whatever is free and report it in the ready file (a port picked here first
    # could be taken by one of Ray's own processes before the router binds it).
    cmd = [sys.executable, "-m", "deploy.cli", "up", "--port", "0", "--metrics-port", "0",
           "--http-port", "auto", "--admin-port", "0",
           "--ready-file", str(ready_path), "--kv-blocks", str(KV_BLOCKS), "--device", "cpu", *flags]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    ports: tuple[int, ...] = ()
    try:
        ready = _wait_ready_file(ready_path, proc, log_path, timeout=300)
        urls = [ready["metrics_url"]] + ([ready["http_url"]] if ready["http_url"] else [])
        ports = (int(ready["address"].rsplit(":", 1)[1]),
                 *(int(url.rsplit(":", 1)[1].split("/")[0]) for url in urls))
        _wait_serving(ready["address"], proc, log_path, timeout=120)
        yield Cluster(ready["address"], ready["metrics_url"], ready["http_url"], ready["admin_address"], proc,
                      log_path)
    finally:
        _stop_like_ctrl_c(proc, ports, log_path)


def actor_pid(cluster: Cluster, actor_class: str) -> int:
    """The worker's process: Ray titles an actor's process `ray::<ActorClass>[.method]`; only those of
    this cluster's session count (other clusters may run on the machine)."""
    out = subprocess.run(["ps", "-eo", "sid=,pid=,args="], capture_output=True, text=True, check=True).stdout
    pids = [int(pid) for sid, pid, *args in (line.split(None, 2) for line in out.splitlines())
            if sid == str(cluster.process.pid) and args and args[0].startswith(f"ray::{actor_class}")]
    assert len(pids) == 1, f"expected one {actor_class} process, found {pids}"
    return pids[0]


def metric(cluster: Cluster, name: str) -> float:
    """The sum of every /metrics sample whose line starts with `name` (a metric, or one of its series)."""
    text = urllib.request.urlopen(cluster.metrics_url, timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    # Every test on the shared cluster runs through speculative decoding (test_cluster checks it).
    with running_cluster(tmp_path_factory.mktemp("cluster"), "--spec", "ngram") as running:
        yield running


def _wait_ready_file(path: Path, proc: subprocess.Popen, log_path: Path, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        if proc.poll() is not None:
            raise RuntimeError(f"pdserve up exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.5)
    raise TimeoutError(f"cluster not ready after {timeout} s:\n{log_path.read_text()[-4000:]}")


def _session_processes(sid: int) -> list[str]:
    """Processes left in the session `pdserve up` led (Ray's gcs_server, raylet, actors live there too)."""
    out = subprocess.run(["ps", "-eo", "sid=,pid=,comm="], capture_output=True, text=True, check=True).stdout
    return [line.strip() for line in out.splitlines() if line.split()[0] == str(sid)]


def _port_is_free(port: int) -> bool:
    """Nobody listens there any more (SO_REUSEADDR: closed connections in TIME_WAIT don't count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _stop_like_ctrl_c(proc: subprocess.Popen, ports: tuple[int, ...], log_path: Path) -> None:
    """SIGINT (what Ctrl-C on `make serve` sends), then: exit 0, no orphaned process, ports freed."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError("pdserve up did not stop within 60 s of SIGINT") from None
    deadline = time.monotonic() + 20
    while _session_processes(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    leftovers = _session_processes(proc.pid)
    if leftovers:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"processes left after Ctrl-C: {leftovers}")
    assert proc.returncode == 0, f"pdserve up exited {proc.returncode}:\n{log_path.read_text()[-3000:]}"
    assert all(_port_is_free(p) for p in ports), f"ports {ports} still bound after shutdown"


@pytest.fixture(scope="module")
def start_cluster():
    """`running_cluster` for a test module that needs its own flags (a module-scoped cluster of its own)."""
    return running_cluster
