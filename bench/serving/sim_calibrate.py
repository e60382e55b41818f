"""Calibrates the CPU cluster's costs on the harness's runs: lone-request regressions, a grid for the rest."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from bench.serving.client import RequestRecord
from bench.serving.metrics import Slo, summarize
from bench.serving.sim_costs import DecodeCost, PrefillCost, StepCosts, TransferCost
from bench.serving.sim_events import simulate
from bench.serving.sim_fit import (
    CPU_KV_BYTES_PER_TOKEN,
    CPU_LAYERS,
    EngineSteps,
    fit_prefill,
    isolated,
    observations,
    residuals_ms,
)
from bench.serving.sim_host import PINNED, PINNED_SHARED, UNPINNED
from bench.serving.sim_runs import RunFile, load_runs
from bench.serving.sim_validate import sim_goodput

METRICS = (("ttft_s", "p50"), ("ttft_s", "p90"), ("tpot_s", "p50"), ("tpot_s", "p90"))


@dataclass(frozen=True)
class Grid:
    """What lone requests cannot tell apart, searched by replaying the runs through the simulator."""
    # Share of the lone TTFT's fixed part that occupies the prefill worker; the rest is latency that
    # occupies nothing (router, reserve call, Ray hops, relays) and overlaps other requests.
    worker_share: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0)
    # Extra decode-step ms per stream in the batch (step(1) is pinned to the lone requests' TPOT).
    per_seq_ms: tuple[float, ...] = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 35.0, 40.0, 45.0)
    # Slowdown of a step while the other worker computes (1P + 1D share the box's 2 cores).
    contention: tuple[float, ...] = (0.0, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)
    # The same for runs whose workers were pinned to cores (sim_host.py): two bare engines pinned side by
    # side slowed each other 0-27% (docs/benchmarks.md, "Disaggregated vs colocated from one run"), so the
    # grid is finer below 1.
    pinned_contention: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0)

    def contention_of(self, placement: str) -> tuple[float, ...]:
        return self.pinned_contention if placement in (PINNED, PINNED_SHARED) else self.contention


def _records(recs: list[dict]) -> list[RequestRecord]:
    return [RequestRecord(**r) for r in recs]


@dataclass(frozen=True)
class Calibration:
    """What the grid is scored on: every run and sweep probe (with the SLO it was judged by), and each
    sweep's configuration with the goodput it measured."""
    runs: tuple[tuple[list[dict], Slo, RunFile], ...]
    sweeps: tuple[tuple[dict, float, RunFile], ...]

    @staticmethod
    def load(paths: list[str | Path], exclude: frozenset[str] = frozenset()) -> Calibration:
        """`exclude`: run names (RunFile.named) held out; a sweep's goodput (named by the stem) is
        also left out when any of its probes is, since the measured figure came from them."""
        runs, sweeps = [], []
        for f in (f for p in paths for f in load_runs(p)):
            d, cfg = f.data, f.config
            named = f.named()
            runs += [(recs, Slo(cfg["slo_ttft"], cfg["slo_tpot"]), f) for name, _, recs in named
                     if name not in exclude]
            held = f.stem in exclude or any(n in exclude for n, _, _ in named)
            if d.get("sweep") and d["sweep"]["goodput_rps"] > 0 and not held:
                sweeps.append((cfg, d["sweep"]["goodput_rps"], f))
        return Calibration(tuple(runs), tuple(sweeps))

    def by_placement(self) -> dict[str, Calibration]:
        """The runs and sweeps split by their placement kind (sim_host.py), kinds in name order."""
        kinds = sorted({f.placement for *_, f in self.runs + self.sweeps})
        return {k: Calibration(tuple(r for r in self.runs if r[2].placement == k),
                               tuple(s for s in self.sweeps if s[2].placement == k)) for k in kinds}


def replay_error(costs: StepCosts, cal: Calibration) -> float:
    """Replays every run (same sends and lengths): the mean over runs of |log(sim / measured)| for TTFT and
    TPOT p50/p90 and of the SLO attainment's absolute difference; plus the mean |log(sim / measured)| of the
    sweeps' goodput, redone by bisection in the simulator (without it the grid fits latencies at low load
    and misses where the cluster saturates). Each run replays with its placement kind's host sharing."""
    errs = []
    for recs, slo, f in cal.runs:
        meas = summarize(_records(recs), slo=slo)
        sim = summarize(simulate(f.spec, costs.for_placement(f.placement), f.replay(recs)), slo=slo)
        errs.append(abs(sim.slo_attainment - meas.slo_attainment))
        for name, q in METRICS:
            errs.append(abs(math.log(getattr(sim, name)[q] / getattr(meas, name)[q])))
    goodput = [abs(math.log(max(sim_goodput(cfg, costs.for_placement(f.placement), f.spec), 1e-3) / measured))
               for cfg, measured, f in cal.sweeps]
    return float(np.mean(errs)) + (float(np.mean(goodput)) if goodput else 0.0)


def fit_cpu(paths: list[str | Path], calibrate_on: list[str | Path] | None = None, grid: Grid = Grid(),
            transfer_gb_per_s: float = 0.31, transfer_latency_ms: float = 1.6,
            exclude: frozenset[str] = frozenset(), engine: EngineSteps | None = None) -> StepCosts:
    """Lone requests (nothing else in flight at their send) of every run in `paths` fix prefill's per-token
    parts, the path's total fixed cost, its spread and a one-stream decode step; the grid then splits and
    loads them against `calibrate_on`'s runs (default: all of `paths`). A run left out of `calibrate_on`
    lends only its lone requests; a run named in `exclude` (RunFile.named) lends nothing.
    With `engine` (the engine alone's timed steps), prefill's cost and the decode step's slope are the
    engine's, a lone request's TTFT beyond its prefill is path latency, and the grid searches only the
    host's contention, once per placement kind (sim_host.py) on that kind's runs; without it one contention
    serves every run."""
    files = [f for p in paths for f in load_runs(p)]
    lone = [o for f in files for name, _, recs in f.named() if name not in exclude
            for o in isolated(observations(f, recs))]
    if not lone:
        raise ValueError("no request ran alone in these runs: the prefill fit needs some")
    transfer = TransferCost(CPU_KV_BYTES_PER_TOKEN, CPU_LAYERS, transfer_gb_per_s, transfer_latency_ms)
    base = engine.prefill if engine else fit_prefill(lone)
    jitter = residuals_ms(lone, base, transfer if engine else None)
    path_ms = float(np.median(jitter)) if engine else 0.0  # engine: the median lone path, the rest spread
    jitter = tuple(round(j - path_ms, 1) for j in jitter)
    one_stream = float(np.median([o.tpot * 1e3 for o in lone if o.tpot is not None]))
    cal = Calibration.load(calibrate_on or paths, exclude)

    def costs(share: float, per_seq: float, contention: float, on_decode: float | None) -> StepCosts:
        return StepCosts(
            prefill=PrefillCost(base.fixed_ms * share, base.per_token_ms, base.per_pair_ms),
            decode=DecodeCost(max(one_stream - per_seq, 0.0), per_seq), transfer=transfer,
            router_ms=path_ms + base.fixed_ms * (1 - share), contention=contention,
            decode_contention=on_decode, path_jitter_ms=jitter,
            prefill_spread=engine.prefill_spread if engine else None,
            decode_spread=engine.decode_spread if engine else None)

    names = ", ".join(Path(p).name for p in paths)
    names += f" without {', '.join(sorted(exclude))}" if exclude else ""
    cal_names = ", ".join(Path(p).name for p in (calibrate_on or paths))
    if engine:
        # With the engine's own costs the grid can afford the host's sharing both ways (how much a running
        # decode slows a prefill step and how much a running prefill slows a decode step), and per placement
        # kind: pinned workers share the host far less than unpinned ones, and one pair serves neither.
        parts = cal.by_placement()
        fits = {kind: min(((replay_error(costs(1.0, engine.per_seq_ms, c, dc), part), (c, dc))
                           for c, dc in itertools.product(grid.contention_of(kind), repeat=2)),
                          key=lambda t: t[0])
                for kind, part in parts.items()}
        if not fits:
            raise ValueError("no run to fit the host's contention on")
        # the default (`contention`, what search and project scale) stays the unpinned cluster's
        c, dc = (fits.get(UNPINNED) or next(iter(fits.values())))[1]
        fitted = replace(costs(1.0, engine.per_seq_ms, c, dc),
                         placement_contention={kind: g for kind, (_, g) in fits.items()})
        per_kind = "; ".join(f"{kind} {g[0]:g} / {g[1]:g} (replay error {e:.3f} over "
                             f"{len(parts[kind].runs)} runs)" for kind, (e, g) in fits.items())
        return replace(fitted, source={
            "prefill": engine.source,
            "path_jitter_ms": f"the {len(lone)} lone requests' TTFT minus the engine's prefill step (ms, "
                              f"{names}): router_ms is their median, each simulated request adds one of "
                              "these residuals around it",
            "decode": f"one-stream step = median lone TPOT {one_stream:.1f} ms; per_seq_ms the engine's",
            "contention": f"by the grid per placement kind (bench/serving/sim_host.py), prefill / decode: "
                          f"{per_kind}; latency, attainment, goodput of {cal_names}; contention / "
                          "decode_contention are the unpinned kind's",
            "transfer": "docs/benchmarks.md, KV transfer CPU/gloo table; SmolLM2-135M KV shape",
            "spread": "prefill_spread / decode_spread: percentiles of the engine alone's timed steps over "
                      "their point's median (prefill) or mean (decode); rho makes 15-step means vary as "
                      "the engine's did"})
    points = itertools.product(grid.worker_share, grid.per_seq_ms, grid.contention, (None,))
    err, g = min(((replay_error(costs(*g), cal), g) for g in points), key=lambda t: t[0])
    share = g[0]
    return replace(costs(*g), source={
        "prefill": f"least squares on the TTFT of the {len(lone)} lone requests in {names}: per-token and "
                   f"per-pair parts; fixed part {base.fixed_ms:.0f} ms split by the grid, {share:.0%} on the "
                   "prefill worker, the rest router_ms (latency that occupies no worker)",
        "path_jitter_ms": f"the {len(lone)} lone requests' TTFT minus the prefill fit (ms, sorted): each "
                          "simulated request adds one to router_ms",
        "decode": f"one-stream step = median lone TPOT {one_stream:.1f} ms; per_seq_ms by the grid",
        "contention": f"by the grid (replay error {err:.3f}: latency, attainment, goodput of {cal_names})",
        "transfer": "docs/benchmarks.md, KV transfer CPU/gloo table (256-token alone GB/s, layerwise exposed "
                    "ms); SmolLM2-135M KV shape",
        "engine": "the harness JSON has no per-step engine timings: step costs are inferred from per-request "
                  "TTFT/TPOT"})
