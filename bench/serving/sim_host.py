"""How a measured run's workers sat on the host's cores (its placement kind), which picks its host sharing."""
from __future__ import annotations

import argparse

# Every stored CPU run was measured on the 2-core box (the run JSON records the load average, not the
# cores); a run's engine processes are counted against these.
HOST_CORES = 2

UNPINNED = "unpinned"  # the OS schedules every process on any core (`--cpu-affinity off`, the default)
PINNED = "pinned"  # `--cpu-affinity auto`, a core (or more) of its own for every engine process
PINNED_SHARED = "pinned-shared"  # `--cpu-affinity auto` with more engine processes than cores: round-robin
KINDS = (UNPINNED, PINNED, PINNED_SHARED)


def placement_kind(up_flags: list[str] | None, cores: int = HOST_CORES) -> str:
    """The run's placement kind from the `pdserve up` flags `bench compare` recorded (None: a run file from
    before they were recorded, unpinned). `pdserve up` starts every prefill and decode worker it is asked
    for, a colocated cluster's idle prefill worker included, so all of them count as engine processes."""
    if up_flags is None:
        return UNPINNED
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--cpu-affinity", default="off")
    p.add_argument("--prefill", type=int, default=1)
    p.add_argument("--decode", type=int, default=1)
    a, _ = p.parse_known_args(up_flags)
    if a.cpu_affinity != "auto":
        return UNPINNED
    return PINNED if a.prefill + a.decode <= cores else PINNED_SHARED
