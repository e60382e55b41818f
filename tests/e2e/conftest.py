"""Starts the real cluster once per session: `pdserve up`, local Ray, 1 prefill + 1 decode, loopback gRPC."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
KV_BLOCKS = 256


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Cluster:
    address: str
    metrics_url: str
    process: subprocess.Popen
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


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    port, metrics_port = free_port(), free_port()
    log_path = tmp_path_factory.mktemp("cluster") / "pdserve-up.log"
    cmd = [sys.executable, "-m", "deploy.cli", "up", "--port", str(port), "--metrics-port", str(metrics_port),
           "--kv-blocks", str(KV_BLOCKS), "--device", "cpu"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        _wait_serving(address, proc, log_path, timeout=300)
        yield Cluster(address, f"http://127.0.0.1:{metrics_port}/metrics", proc, log_path)
    finally:
        _stop_like_ctrl_c(proc, (port, metrics_port), log_path)


def _session_processes(sid: int) -> list[str]:
    """Processes left in the session `pdserve up` led (Ray's gcs_server, raylet, actors live there too)."""
    out = subprocess.run(["ps", "-eo", "sid=,pid=,comm="], capture_output=True, text=True, check=True).stdout
    return [line.strip() for line in out.splitlines() if line.split()[0] == str(sid)]


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
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
