"""Replays the harness's measured runs through the simulator: sim vs measured, with relative errors."""
from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass
from pathlib import Path

from bench.serving.arrivals import arrival_offsets
from bench.serving.goodput import find_goodput
from bench.serving.metrics import Slo, percentile, summarize
from bench.serving.sim_costs import StepCosts
from bench.serving.sim_events import ClusterSpec, SimRequest, Simulation, simulate
from bench.serving.sim_runs import LEGACY_CLUSTER, RunFile, load_runs, prefixes
from bench.serving.workload import SharedPrefix, WorkloadSpec, parse_length, synthesize

CPU_CLUSTER = LEGACY_CLUSTER  # what a run file without `up_flags` ran on


BOOTSTRAP = 2000  # resamples for a measured percentile's noise band
# Replays per run when the costs carry a step spread: each figure is the median over these seeds, an
# attainment the mean (one seed's figure moves by about the 15% tolerance on these 16-request probes).
SEEDS = 5


def seeds(costs: StepCosts) -> range:
    """The seeds a replay runs: one when every step's cost is exact (the seed changes nothing)."""
    return range(SEEDS if costs.prefill_spread or costs.decode_spread else 1)


@dataclass(frozen=True)
class Row:
    run: str
    metric: str
    measured: float
    simulated: float
    # 90% bootstrap interval of the measured figure (its requests resampled): how far the same cluster's
    # rerun could land from `measured` on sampling alone. None: not a per-request percentile.
    band: tuple[float, float] | None = None

    @property
    def rel_err(self) -> float:
        return (self.simulated - self.measured) / self.measured if self.measured else float("nan")

    @property
    def in_band(self) -> bool | None:
        return None if self.band is None else self.band[0] <= self.simulated <= self.band[1]


def noise_band(values: list[float], q: float, seed: int = 0) -> tuple[float, float]:
    """5th and 95th percentile of the q-th percentile over bootstrap resamples of `values` (seeded)."""
    rng = random.Random(seed)
    stats = [percentile(rng.choices(values, k=len(values)), q) for _ in range(BOOTSTRAP)]
    return percentile(stats, 5), percentile(stats, 95)


def _compare(run: str, measured: dict, records: list[dict], costs: StepCosts, file: RunFile,
             slo: Slo, local: list[int] | None = None) -> list[Row]:
    """`local`, if given, gains the prompts the replay prefilled on a decode worker (conditional; the
    median over the seeds)."""
    replays = [Simulation(file.spec, costs, file.replay(records), seed) for seed in seeds(costs)]
    sims = [summarize(r.run(), slo=slo) for r in replays]
    if local is not None:
        local.append(statistics.median(sum(n for key, n in r.placements.items() if key.startswith("local/"))
                                       for r in replays))
    judged = [r for r in records if r["status"] == "OK" and not r["warmup"]]
    rows = []
    for name in ("ttft_s", "tpot_s"):
        values = [r[name[:4]] * 1e3 for r in judged if r[name[:4]] is not None]
        for q in ("p50", "p90"):
            sim_q = statistics.median(getattr(sim, name)[q] for sim in sims)
            rows.append(Row(run, f"{name[:4].upper()} {q} ms", measured[name][q] * 1e3, sim_q * 1e3,
                            noise_band(values, float(q[1:]))))
    rows.append(Row(run, "within SLO", measured["slo_attainment"],
                    statistics.fmean(sim.slo_attainment or 0.0 for sim in sims)))
    return rows


def sim_goodput(config: dict, costs: StepCosts, spec: ClusterSpec) -> float:
    """The sweep redone in the simulator: the same seeded workload and arrival schedule at each probed rate,
    the same bisection settings, so only the cluster model differs; a probe's attainment is the mean over
    the replay seeds (the expected share, which bisection can trust to grow as the rate falls)."""
    slo = Slo(config["slo_ttft"], config["slo_tpot"])
    n = config["num_requests"][0] if isinstance(config["num_requests"], list) else config["num_requests"]
    sp = SharedPrefix(*config["shared_prefix"]) if config.get("shared_prefix") else None
    wl = synthesize(WorkloadSpec(n, parse_length(config["prompt_len"]), parse_length(config["output_len"]),
                                 config["seed"], sp))
    pre = prefixes({**config, "num_requests": n})

    def attainment_at(rate: float) -> float:
        offsets = arrival_offsets(config["arrival"], rate, n, config["seed"])
        reqs = [SimRequest(t, r.prompt_tokens, r.max_tokens, i < config["warmup"], pre[i])
                for i, (t, r) in enumerate(zip(offsets, wl, strict=True))]
        return statistics.fmean(summarize(simulate(spec, costs, reqs, seed), slo=slo).slo_attainment or 0.0
                                for seed in seeds(costs))

    low, high = config["sweep"]
    return find_goodput(attainment_at, low, high, target=config["slo_target"], rel_tol=config["sweep_tol"],
                        max_probes=config["sweep_probes"]).rate


def validate(paths: list[str | Path], costs: StepCosts) -> list[Row]:
    """Every run of every file replayed on the cluster spec its file ran on (sim_runs.cluster_for), with the
    host sharing of its placement kind (StepCosts.for_placement)."""
    rows: list[Row] = []
    for f in (f for path in paths for f in load_runs(path)):
        d, cfg, run_costs = f.data, f.config, costs.for_placement(f.placement)
        slo = Slo(cfg["slo_ttft"], cfg["slo_tpot"])
        if d.get("sweep"):
            local: list[int] = []
            for p in d["sweep"]["probes"]:
                rows += _compare(f"{f.stem}@{p['rate']:g}", p["summary"], p["records"], run_costs, f, slo,
                                 local)
            rows.append(Row(f.stem, "goodput req/s", d["sweep"]["goodput_rps"],
                            sim_goodput(cfg, run_costs, f.spec)))
            placed = d.get("prefill_placements") or {}
            if f.spec.mode == "cond" and placed:  # the router's counts: every probe and warm-up together
                measured = sum(n for key, n in placed.items() if key.startswith("local/"))
                rows.append(Row(f.stem, "local prefills", measured, sum(local)))
        else:
            rows += _compare(f.stem, d["run"], d["records"], run_costs, f, slo)
    return rows


SLOWDOWNS = tuple(1 + 0.125 * i for i in range(25))  # 1x to 4x


def host_slowdown(path: str | Path, costs: StepCosts,
                  factors: tuple[float, ...] = SLOWDOWNS) -> tuple[float, list[Row]]:
    """A diagnostic for a single run the costs miss: the one factor (StepCosts.slowed) that best replays it
    (mean |log sim / measured| of TTFT and TPOT p50/p90), and its rows. A good fit with one factor says the
    cluster model holds and the host was that much slower during the run."""
    def score(rows: list[Row]) -> float:
        return sum(abs(math.log(r.simulated / r.measured)) for r in rows if r.metric.endswith("ms"))

    best = min(((score(rows), k, rows) for k in factors
                for rows in [validate([path], costs.slowed(k))]), key=lambda t: t[0])
    return best[1], best[2]


def format_rows(rows: list[Row]) -> str:
    """One line a figure; `noise band` is the measured figure's 90% bootstrap interval, `in` whether the
    simulated figure lies inside it."""
    lines = [f"{'run':<18} {'metric':<16} {'measured':>10} {'sim':>10} {'rel err':>8} "
             f"{'noise band':>21} {'in':>3}"]
    for r in rows:
        band = f"[{r.band[0]:.0f}, {r.band[1]:.0f}] {(r.band[1] - r.band[0]) / 2 / r.measured:>4.0%}" \
            if r.band else ""
        inside = {None: "", True: "yes", False: "no"}[r.in_band]
        lines.append(f"{r.run:<18} {r.metric:<16} {r.measured:>10.3f} {r.simulated:>10.3f} "
                     f"{r.rel_err:>+8.1%} {band:>21} {inside:>3}")
    return "\n".join(lines)
