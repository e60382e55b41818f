"""The engine's step-to-step spread: a quantile table of step time over its level, walked with correlation."""
from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

QUANTILES = 40  # a table of 41 ratios: the 0th, 2.5th, ..., 100th percentile
# Consecutive steps the correlation is fitted over: a 16-token answer's TPOT is the mean of 15 decode steps
# (the runs' outputs), so the fitted walk gives a request's TPOT the spread the engine's own 15-step
# stretches had, not the sqrt(15)-narrower spread of independent steps.
SPELL_STEPS = 15


@dataclass(frozen=True)
class StepSpread:
    """quantiles: evenly spaced percentiles (min and max included) of a step's time over its point's level;
    rho: a step's correlation with the one before it on the same worker (an AR(1) walk under the table)."""
    quantiles: tuple[float, ...]
    rho: float = 0.0

    def factor(self, u: float) -> float:
        """The time factor at uniform draw u in [0, 1): linear between the table's percentiles (an inverse
        CDF), so uniform draws replay the measured distribution."""
        q = self.quantiles
        x = u * (len(q) - 1)
        i = min(int(x), len(q) - 2)
        return q[i] + (q[i + 1] - q[i]) * (x - i)

    @staticmethod
    def from_dict(d: dict | None) -> StepSpread | None:
        return None if not d else StepSpread(tuple(d["quantiles"]), d.get("rho", 0.0))


class SpreadWalk:
    """Per worker and step kind, a Gaussian AR(1) state z (z' = rho z + sqrt(1 - rho^2) e) mapped through
    the normal CDF onto the quantile table: every step's factor has the measured distribution and
    consecutive steps of one worker correlate as the engine's did. Seeded: a run replays exactly."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self._z: dict[tuple[str, int, str], float] = {}

    def factor(self, spread: StepSpread, key: tuple[str, int, str]) -> float:
        """The next step's factor on `key` (worker role, worker index, step kind)."""
        e = self._rng.gauss(0.0, 1.0)
        z = self._z.get(key)
        z = e if z is None else spread.rho * z + math.sqrt(1 - spread.rho ** 2) * e
        self._z[key] = z
        return spread.factor(min(0.5 * (1 + math.erf(z / math.sqrt(2))), 1 - 1e-12))


def ratios(points: Sequence[Sequence[float]], center: str) -> list[list[float]]:
    """Each point's timed steps over its own `center` ("median" or "mean"): a batch's or a prompt length's
    level is the regression's job, what is left is how one step of it varies. Points of < 2 steps drop."""
    out = []
    for steps in (s for s in points if len(s) >= 2):
        level = statistics.median(steps) if center == "median" else statistics.fmean(steps)
        out.append([s / level for s in steps])
    return out


def table(values: Sequence[float], quantiles: int = QUANTILES) -> tuple[float, ...]:
    """Evenly spaced percentiles of `values`, min and max included, rounded."""
    inner = statistics.quantiles(values, n=quantiles, method="inclusive")
    return tuple(round(v, 4) for v in (min(values), *inner, max(values)))


def mean_variance_ratio(rho: float, length: int) -> float:
    """Var(mean of `length` consecutive steps) / Var(one step), an AR(1) walk of lag-1 correlation rho."""
    return (1 + 2 * sum((1 - k / length) * rho ** k for k in range(1, length))) / length


def fit_rho(series: Sequence[Sequence[float]], length: int = SPELL_STEPS) -> float:
    """The rho whose walk gives means of `length` consecutive steps the variance (over one step's) that the
    measured series' stretches had, pooled over the series; 0 when they are too short to tell."""
    spells, steps = [], []
    for s in (s for s in series if len(s) >= 2 * length):
        level = statistics.fmean(s)
        steps += [x / level for x in s]
        spells += [statistics.fmean(s[i:i + length]) / level for i in range(len(s) - length + 1)]
    if not spells:
        return 0.0
    target = statistics.pvariance(spells) / statistics.pvariance(steps)
    lo, hi = 0.0, 0.999
    if mean_variance_ratio(lo, length) >= target:
        return 0.0
    for _ in range(50):  # the ratio grows with rho: bisect
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_variance_ratio(mid, length) < target else (lo, mid)
    return round(lo, 4)


def fit_spread(points: Sequence[Sequence[float]], center: str) -> StepSpread | None:
    """A step kind's spread from its timed points (bench.serving.sim_engine's steps_ms); None: no steps."""
    normalized = ratios(points, center)
    if not normalized:
        return None
    return StepSpread(table([r for s in normalized for r in s]), fit_rho(normalized))
