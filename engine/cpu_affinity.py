"""Pins the calling worker process, every thread it has, to a set of cores (EngineConfig.cpu_affinity)."""
from __future__ import annotations

import os
from collections.abc import Iterable


def pin_process(cores: Iterable[int]) -> None:
    """sched_setaffinity on pid 0 moves only the calling thread: a Ray worker already runs several (gRPC, the
    event loop), so each thread listed in /proc/self/task is pinned; threads started later (the engine thread,
    torch's pool) inherit it from the thread that starts them."""
    wanted = set(cores)
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), wanted)
        except ProcessLookupError:  # the thread ended between the listing and the call
            pass
