"""`pdserve up --cpu-affinity auto`: the cores each worker process is pinned to, and when it applies."""
from __future__ import annotations

import os
from collections.abc import Sequence

CPU_AFFINITY_MODES = ("off", "auto")


class AffinityError(ValueError):
    """--cpu-affinity cannot apply to this cluster (the message says which flag is in the way)."""


def allowed_cores() -> tuple[int, ...]:
    """The cores this process may run on (a cgroup or taskset may allow fewer than the machine has)."""
    return tuple(sorted(os.sched_getaffinity(0)))


def plan_affinity(cores: Sequence[int], workers: int) -> tuple[tuple[int, ...], ...]:
    """Worker i's cores, for workers in spawn order. With at least as many cores as workers each worker gets
    its own contiguous share (the first `len(cores) % workers` one core more), so no two share a core; with
    fewer, one core each, round-robin (worker i on cores[i % len(cores)])."""
    if workers < 1:
        raise AffinityError(f"need at least one worker to pin, got {workers}")
    if not cores:
        raise AffinityError("no cores to pin workers to")
    if len(set(cores)) != len(cores) or min(cores) < 0:
        raise AffinityError(f"cores must be distinct non-negative ids, got {list(cores)}")
    cores = sorted(cores)
    if workers >= len(cores):
        return tuple((cores[i % len(cores)],) for i in range(workers))
    share, extra = divmod(len(cores), workers)
    plan, start = [], 0
    for i in range(workers):
        size = share + (i < extra)
        plan.append(tuple(cores[start:start + size]))
        start += size
    return tuple(plan)


def check_affinity_flags(device: str, prefill_tp: int, decode_tp: int, ray_address: str | None) -> None:
    """--cpu-affinity auto pins each worker process to cores of this machine: CPU, TP 1, local Ray only."""
    if device != "cpu":
        raise AffinityError(f"--cpu-affinity auto pins CPU workers; it does not apply to --device {device}")
    if prefill_tp != 1 or decode_tp != 1:
        raise AffinityError("--cpu-affinity auto gives each worker process its own cores; tensor-parallel "
                            f"ranks would share them (got --prefill-tp {prefill_tp} --decode-tp {decode_tp})")
    if ray_address is not None:
        raise AffinityError("--cpu-affinity auto plans over this machine's cores; with --ray-address the "
                            "workers may run on other nodes")
