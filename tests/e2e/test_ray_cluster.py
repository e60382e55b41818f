"""An operator's two-node Ray cluster on loopback: `pdserve up --ray-address` joins it (token auth), places
each role on the node that declares its resource, and survives the decode node's raylet being killed."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import REPO, _stop_like_ctrl_c, _wait_ready_file, _wait_serving

from proto.api import pb, pb_grpc

pytestmark = [pytest.mark.e2e, pytest.mark.soak, pytest.mark.timeout(600)]

RAY = str(Path(sys.executable).parent / "ray")
REJOIN_WITHIN_S = 120.0  # node death noticed by Ray, actor restarted on the new node, model loaded, rejoined


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_of(temp_dir: str, sid: int) -> list[int]:
    """This node's processes: those of the session `ray start` led, and any that holds a file in its temp
    dir (Ray's agents outlive a killed raylet and re-title themselves, so their command line may not say)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        with contextlib.suppress(OSError):
            if os.getsid(pid) == sid or any(temp_dir in os.readlink(fd) for fd in (entry / "fd").iterdir()):
                found.append(pid)
    return [p for p in found if p != os.getpid()]


class RayNode:
    """One `ray start --block` in a session of its own, with its own temp dir; `stop` kills only its PIDs."""

    def __init__(self, args: list[str], resources: str, port: int | None = None) -> None:
        self.port = port  # the head's GCS port
        self.temp_dir = tempfile.mkdtemp(prefix="pdserve-ray-")
        env = {**os.environ, "RAY_AUTH_MODE": "token"}  # the operator's nodes use the cluster's token
        self.log = open(Path(self.temp_dir) / "ray-start.log", "w")  # noqa: SIM115 -- closed in stop()
        self.proc = subprocess.Popen([RAY, "start", "--block", "--temp-dir", self.temp_dir, "--num-cpus", "1",
                                      "--resources", resources, *args], stdout=self.log,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def raylet_pid(self) -> int | None:
        out = subprocess.run(["pgrep", "-f", f"raylet .*{self.temp_dir}"], capture_output=True, text=True)
        pids = [int(p) for p in out.stdout.split()]
        return pids[0] if pids else None

    def stop(self) -> None:
        for pid in _pids_of(self.temp_dir, self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"Ray head not listening on {port} after {timeout} s")


def _worker_node(actor_class: str, nodes: list[RayNode]) -> RayNode:
    """The node whose raylet is the parent of the actor's process."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True, check=True).stdout
    parents = [int(line.split()[1]) for line in out.splitlines()
               if len(line.split()) > 2 and line.split()[2].startswith(f"ray::{actor_class}")]
    assert len(parents) == 1, f"expected one {actor_class}, found parents {parents}"
    return next(n for n in nodes if n.raylet_pid() == parents[0])


def _generate(address: str) -> list[int]:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.PDServeStub(channel)
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 504, 3458, 282]),
                                     sampling=pb.SamplingOptions(max_tokens=8, ignore_eos=True))
        responses = stub.Generate(request, timeout=60)
        return [t for r in responses if r.HasField("delta") for t in r.delta.token_ids]


@pytest.fixture
def two_nodes() -> Iterator[list[RayNode]]:
    port = _free_port()
    nodes = [RayNode(["--head", "--port", str(port), "--node-ip-address", "127.0.0.1",
                      "--include-dashboard=false"], '{"pdserve_prefill": 1}', port)]
    try:
        _wait_port(port, 60)
        nodes.append(RayNode(["--address", f"127.0.0.1:{port}"], '{"pdserve_decode": 1}'))
        yield nodes
    finally:
        for node in reversed(nodes):
            node.stop()


def test_pdserve_joins_an_operators_cluster_places_roles_and_survives_a_raylet_kill(two_nodes, tmp_path):
    head, decode_node = two_nodes
    ready_path, log_path = tmp_path / "ready.json", tmp_path / "pdserve-up.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}  # as a user's shell has it
    cmd = [sys.executable, "-m", "deploy.cli", "up", "--ray-address", f"127.0.0.1:{head.port}",
           "--port", "0", "--metrics-port", "0", "--http-port", "0", "--ready-file", str(ready_path),
           "--kv-blocks", "128", "--device", "cpu"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env={**env, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    ports: tuple[int, ...] = ()
    try:
        ready = _wait_ready_file(ready_path, proc, log_path, timeout=300)
        address = ready["address"]
        ports = (int(address.rsplit(":", 1)[1]),)
        _wait_serving(address, proc, log_path, timeout=120)
        reference = _generate(address)
        assert _worker_node("PrefillWorkerActor", two_nodes) is head
        assert _worker_node("DecodeWorkerActor", two_nodes) is decode_node

        # Fault: the decode node's raylet dies. The operator (here: the test) adds a node with the resource.
        raylet = decode_node.raylet_pid()
        assert raylet is not None
        os.kill(raylet, signal.SIGKILL)
        killed_at = time.monotonic()
        replacement = RayNode(["--address", f"127.0.0.1:{head.port}"], '{"pdserve_decode": 1}')
        two_nodes.append(replacement)
        while True:
            with contextlib.suppress(grpc.RpcError):
                if _generate(address) == reference:
                    break
            assert time.monotonic() - killed_at < REJOIN_WITHIN_S, log_path.read_text()[-3000:]
            time.sleep(1)
        print(f"decode node's raylet killed -> serving again on the new node in "
              f"{time.monotonic() - killed_at:.1f} s")
        assert _worker_node("DecodeWorkerActor", two_nodes) is replacement
    finally:
        _stop_like_ctrl_c(proc, ports, log_path)
