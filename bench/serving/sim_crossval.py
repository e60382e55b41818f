"""Held-out check of the CPU calibration: each run file is fitted without it, then replayed against it."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.serving.sim_calibrate import Grid, fit_cpu
from bench.serving.sim_fit import EngineSteps
from bench.serving.sim_validate import Row, validate

TOLERANCE = 0.15  # the goal: every TTFT/TPOT p50/p90 and goodput within 15%


@dataclass(frozen=True)
class Compared:
    """One measured figure with its in-sample (fitted on every run) and held-out (fitted without its own
    run) simulations."""
    in_sample: Row
    held_out: Row

    @property
    def run(self) -> str:
        return self.in_sample.run

    @property
    def metric(self) -> str:
        return self.in_sample.metric


def crossval(paths: list[str | Path], grid: Grid | None = None,
             engine: EngineSteps | None = None) -> list[Compared]:
    """Fits on all of `paths` (in-sample), then once per run with that run left out (leave one run out: each
    sweep probe and each single run, lone requests included; the sweep's goodput figure is held out alone,
    fitted on its probes' latencies but not on it), and pairs up every figure."""
    grid = grid or Grid()
    in_rows = validate(paths, fit_cpu(paths, grid=grid, engine=engine))
    runs = list(dict.fromkeys(r.run for r in in_rows))
    if len(runs) < 2:
        raise ValueError("cross-validation needs at least two runs")
    held: dict[tuple[str, str], Row] = {}
    for run in runs:
        costs = fit_cpu(paths, grid=grid, exclude=frozenset({run}), engine=engine)
        held.update({(r.run, r.metric): r for r in validate(paths, costs) if r.run == run})
    return [Compared(r, held[(r.run, r.metric)]) for r in in_rows]


def counts(rows: list[Row], kind: str) -> str:
    """How many of the rows of one kind (TTFT, TPOT, goodput) land within 15%, and inside the noise band."""
    mine = [r for r in rows if r.metric.startswith(kind)]
    within = sum(abs(r.rel_err) <= TOLERANCE for r in mine)
    banded = [r for r in mine if r.band is not None]
    in_band = f", {sum(bool(r.in_band) for r in banded)} in the noise band" if banded else ""
    return f"{kind}: {within}/{len(mine)} within {TOLERANCE:.0%}{in_band}"


def format_crossval(compared: list[Compared]) -> str:
    """A table (measured, in-sample sim and error, held-out sim and error, the measured figure's noise band)
    and, for each column, how many TTFT / TPOT / goodput figures land within 15% and inside the band."""
    lines = [f"{'run':<16} {'metric':<14} {'measured':>9} {'in-sample':>10} {'err':>7} {'held-out':>10} "
             f"{'err':>7}  noise band (90%)"]
    for c in compared:
        i, h = c.in_sample, c.held_out
        if c.metric == "within SLO":
            lines.append(f"{c.run:<16} {c.metric:<14} {i.measured:>9.0%} {i.simulated:>10.0%} {'':>7} "
                         f"{h.simulated:>10.0%}")
            continue
        band = f"[{i.band[0]:.0f}, {i.band[1]:.0f}]" if i.band else ""
        lines.append(f"{c.run:<16} {c.metric:<14} {i.measured:>9.3f} {i.simulated:>10.3f} {i.rel_err:>+7.1%} "
                     f"{h.simulated:>10.3f} {h.rel_err:>+7.1%}  {band}")
    for label, rows in (("in-sample", [c.in_sample for c in compared]),
                        ("held-out", [c.held_out for c in compared])):
        lines.append(f"{label}: " + "; ".join(counts(rows, k) for k in ("TTFT", "TPOT", "goodput")))
    return "\n".join(lines)


def save_crossval(compared: list[Compared], path: Path) -> None:
    path.write_text(json.dumps([{"in_sample": asdict(c.in_sample), "held_out": asdict(c.held_out)}
                                for c in compared], indent=1) + "\n")
