"""`pdserve up --cpu-affinity`: the pinning plan (cores x workers -> each worker's cores), the flag's checks
and errors, EngineConfig's validation, and pinning every thread of a process; no model, no Ray."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from deploy import cli
from deploy.affinity import AffinityError, check_affinity_flags, plan_affinity
from deploy.cli import build_parser
from engine.config import EngineConfig


@pytest.mark.parametrize(("cores", "workers", "plan"), [
    ((0, 1), 2, ((0,), (1,))),  # 1P+1D or two colocated workers on this 2-core box: a core each
    ((0, 1), 3, ((0,), (1,), (0,))),  # more workers than cores: round-robin, one core each
    ((0, 1), 1, ((0, 1),)),
    ((0, 1, 2, 3), 3, ((0, 1), (2,), (3,))),  # the first workers take the remainder
    ((0, 1, 2, 3, 4, 5, 6, 7), 2, ((0, 1, 2, 3), (4, 5, 6, 7))),
    ((7, 2, 5), 2, ((2, 5), (7,))),  # a taskset/cgroup's allowed cores need not start at 0 nor be sorted
])
def test_plan_gives_each_worker_its_own_cores_until_workers_outnumber_them(cores, workers, plan) -> None:
    assert plan_affinity(cores, workers) == plan


@pytest.mark.parametrize(("cores", "workers", "message"), [
    ((0, 1), 0, "need at least one worker"),
    ((), 2, "no cores"),
    ((0, 0, 1), 2, "distinct non-negative"),
    ((-1, 1), 2, "distinct non-negative"),
])
def test_plan_refuses_what_it_cannot_pin(cores, workers, message) -> None:
    with pytest.raises(AffinityError, match=message):
        plan_affinity(cores, workers)


def test_flag_defaults_to_off_and_accepts_auto() -> None:
    assert build_parser().parse_args(["up"]).cpu_affinity == "off"
    assert build_parser().parse_args(["up", "--cpu-affinity", "auto"]).cpu_affinity == "auto"


def test_a_bad_flag_value_names_the_flag_and_the_choices(capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["up", "--cpu-affinity", "0,1"])
    err = capsys.readouterr().err
    assert "argument --cpu-affinity: invalid choice: '0,1' (choose from" in err and "auto" in err


@pytest.mark.parametrize(("device", "prefill_tp", "decode_tp", "ray_address", "message"), [
    ("cuda", 1, 1, None, "does not apply to --device cuda"),
    ("cpu", 2, 1, None, "tensor-parallel ranks would share them"),
    ("cpu", 1, 1, "auto", "with --ray-address the workers may run on other nodes"),
])
def test_flag_is_refused_where_it_cannot_pin_one_process_per_worker(device, prefill_tp, decode_tp,
                                                                    ray_address, message) -> None:
    with pytest.raises(AffinityError, match=message):
        check_affinity_flags(device, prefill_tp, decode_tp, ray_address)
    check_affinity_flags("cpu", 1, 1, None)


def test_up_refuses_the_flag_on_cuda_before_starting_anything(capsys) -> None:
    assert cli.main(["up", "--device", "cuda", "--cpu-affinity", "auto"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: pdserve up")
    assert "--cpu-affinity auto pins CPU workers; it does not apply to --device cuda" in err


@pytest.mark.parametrize("cores", [(0, 0), (-1,)])
def test_engine_config_refuses_bad_core_ids(cores) -> None:
    with pytest.raises(ValueError, match="cpu_affinity must be distinct non-negative core ids"):
        EngineConfig(cpu_affinity=cores)


def test_pin_process_moves_every_thread_and_the_threads_started_after() -> None:
    # In a child process: pinning the test runner itself would slow every later test on a shared box.
    core = min(os.sched_getaffinity(0))
    script = f"""
import os, threading
from engine.cpu_affinity import pin_process
hold = threading.Event()
before = threading.Thread(target=hold.wait)
before.start()
pin_process([{core}])
later = []
after = threading.Thread(target=lambda: later.append(os.sched_getaffinity(0)))
after.start(); after.join()
print(sorted(os.sched_getaffinity(0)), sorted(os.sched_getaffinity(before.native_id)), sorted(later[0]))
hold.set()
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.stdout.split() == [f"[{core}]"] * 3
