"""Open-loop arrival schedules: send offsets in seconds from the run's start (Poisson or constant rate)."""
from __future__ import annotations

import random

ARRIVALS = ("poisson", "constant")


def arrival_offsets(kind: str, rate: float, n: int, seed: int = 0) -> list[float]:
    """n send times for `rate` requests/s; the first goes at 0 s. Poisson: exponential gaps, seeded."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")
    if kind == "constant":
        return [i / rate for i in range(n)]
    if kind != "poisson":
        raise ValueError(f"arrival process {kind!r}: expected one of {', '.join(ARRIVALS)}")
    rng = random.Random(seed)
    offsets, t = [], 0.0
    for _ in range(n):
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets
