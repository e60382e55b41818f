"""Goodput: the highest request rate at which a target share of requests meets both SLOs, by bisection."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Probe:
    rate: float
    attainment: float


@dataclass(frozen=True)
class GoodputResult:
    rate: float  # highest probed rate that met the target; 0.0 if even the lowest did not
    probes: tuple[Probe, ...]  # in the order they ran
    bound: str  # "bisected", "below_low" (low failed) or "at_high" (high passed: goodput may be higher)


def find_goodput(attainment_at: Callable[[float], float], low: float, high: float, target: float = 0.9,
                 rel_tol: float = 0.1, max_probes: int = 8) -> GoodputResult:
    """Assumes attainment falls as the rate rises. Probes low and high, then halves [pass, fail] until it is
    within rel_tol of its upper end or max_probes ran. Each probe is one bounded run at that rate."""
    if not 0 < low < high:
        raise ValueError(f"need 0 < low < high, got {low}, {high}")
    if max_probes < 2:
        raise ValueError("max_probes must be >= 2 (low and high)")
    probes: list[Probe] = []

    def passes(rate: float) -> bool:
        probes.append(Probe(rate, attainment_at(rate)))
        return probes[-1].attainment >= target

    if not passes(low):
        return GoodputResult(0.0, tuple(probes), "below_low")
    if passes(high):
        return GoodputResult(high, tuple(probes), "at_high")
    ok, bad = low, high
    while len(probes) < max_probes and (bad - ok) > rel_tol * bad:
        mid = (ok + bad) / 2
        if passes(mid):
            ok = mid
        else:
            bad = mid
    return GoodputResult(ok, tuple(probes), "bisected")
