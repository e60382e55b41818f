"""A TP worker's follower ranks never outlive it: stopped with it, and gone when its process is killed."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# A TP=2 worker's ranks: rank 0 in this process, rank 1 spawned; it prints the follower's pid and waits.
WORKER = """
import dataclasses, sys, time
from engine.config import EngineConfig
from engine.tp.worker_ranks import LocalTPRanks
ranks = LocalTPRanks(EngineConfig(model_path="random:tiny", num_kv_blocks=8, num_threads=1, tp_size=2))
print(" ".join(str(r.pid) for r in ranks.ranks[1:]), flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purpose (its parent, the killed worker, never reaped it).
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(")")[-1].split()[0] != "Z"


@pytest.mark.timeout(120)
def test_followers_exit_when_the_worker_is_killed():
    worker = subprocess.Popen([sys.executable, "-c", WORKER], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        pids = [int(p) for p in worker.stdout.readline().split()]
        assert pids and all(_alive(p) for p in pids)
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids)
    finally:
        worker.kill()
