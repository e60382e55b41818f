"""CPU by role from /proc snapshots: each `pdserve up` window, each process from first sight to last."""
from __future__ import annotations

from pathlib import Path

import pytest

from bench.serving.cpu_share import TICKS_PER_S, per_cluster, role, snapshot


def test_roles_come_from_the_command_line() -> None:
    assert role("python -m deploy.cli bench compare --up a: --decode 2") == "client"
    assert role("python -m deploy.cli up --port 0") == "router process"
    assert [role(c) for c in ("ray::DecodeWorkerActor", "ray::PrefillWorkerActor", "ray::DashboardAgent",
                              "/x/ray/core/src/ray/raylet/raylet", "bash")] == [
        "decode worker", "prefill worker", "ray", "ray", "other"]


def test_a_cluster_window_counts_cores_by_role(tmp_path: Path) -> None:
    t = TICKS_PER_S
    log = tmp_path / "cpu.log"
    log.write_text(
        f"T 100.0\n1 {5 * t} python -m deploy.cli up --port 0\n2 {10 * t} ray::DecodeWorkerActor\n"
        f"9 {50 * t} bash\n"
        f"T 110.0\n1 {6 * t} python -m deploy.cli up --port 0\n2 {19 * t} ray::DecodeWorkerActor\n"
        f"3 {2 * t} ray::PrefillWorkerActor\n9 {51 * t} bash\n"
        f"T 120.0\n9 {52 * t} bash\n")  # the cluster is gone: its window was 100-110 s
    [(pid, wall, cores)] = per_cluster(log)
    assert (pid, wall) == (1, 10.0)
    # the prefill worker was born inside the window: all its ticks count
    assert cores == pytest.approx({"router process": 0.1, "decode worker": 0.9, "prefill worker": 0.2,
                                   "other": 0.1})


def test_a_snapshot_sees_this_process() -> None:
    import os
    ticks, cmd = snapshot()[os.getpid()]  # pytest has used CPU by now
    assert ticks > 0 and "\n" not in cmd and ("python" in cmd or "pytest" in cmd)
