"""`python -m bench.serving.sim`: fit step costs, validate on the measured runs, search P:D x TP, project."""
from __future__ import annotations

import argparse
import glob
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from bench.serving.metrics import Slo
from bench.serving.sim_bound import bounds, request_work
from bench.serving.sim_calibrate import fit_cpu
from bench.serving.sim_costs import StepCosts, load_costs, save_costs
from bench.serving.sim_crossval import counts, crossval, format_crossval, save_crossval
from bench.serving.sim_fit import EngineSteps, fit_h100
from bench.serving.sim_search import MIXES, SearchSettings, best_bound, project, search, work_bound
from bench.serving.sim_validate import format_rows, host_slowdown, validate

# The runs measured on the current tree (`bench compare` with up_flags); the older serving_cpu_{sweep,run,
# shared_prefix}.json, taken at eadcd02 before fair prefill and the prefix cache, replay with --runs.
CPU_RUNS = "bench/results/serving_cpu_tree_*.json"
H100_COSTS = "bench/results/sim_costs_h100.json"
CPU_COSTS = "bench/results/sim_costs_cpu.json"
ENGINE_STEPS = "bench/results/sim_engine_cpu.json"  # bench.serving.sim_engine's timed steps


def _paths(patterns: list[str]) -> list[str]:
    out = sorted({p for pat in patterns for p in (glob.glob(pat) or [pat])})
    missing = [p for p in out if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"no such run JSON: {', '.join(missing)}")
    return out


def _engine(args: argparse.Namespace) -> EngineSteps | None:
    return None if args.engine == "none" else EngineSteps.load(args.engine)


def _settings(args: argparse.Namespace) -> SearchSettings:
    extra = {} if args.coloc_fused is None else {
        "coloc_fused": tuple(float(x) for x in args.coloc_fused.split(","))}
    return SearchSettings(tp_choices=tuple(int(x) for x in args.tp.split(",")),
                          tp_efficiency=args.tp_efficiency, max_num_seqs=args.max_num_seqs, seed=args.seed,
                          arrival=args.arrival, coloc_pooled=args.cpu_units, conditional=args.cpu_units,
                          unit_max_gpus=args.unit_max,
                          **extra)


def _costs(args: argparse.Namespace) -> StepCosts:
    """The costs file, its host sharing scaled by --host-contention (0: a core of its own for every worker
    and spare ones for the router, client and Ray)."""
    costs, k = load_costs(args.costs), args.host_contention
    dc = costs.decode_contention
    return replace(costs, contention=costs.contention * k, decode_contention=None if dc is None else dc * k)


def _mixes(args: argparse.Namespace) -> list:
    mixes = [MIXES[m] for m in args.mix.split(",")]
    if args.slo_ttft or args.slo_tpot:
        mixes = [replace(m, slo=Slo(args.slo_ttft or m.slo.ttft, args.slo_tpot or m.slo.tpot)) for m in mixes]
    return mixes


def cmd_fit(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    if args.target == "cpu":
        costs = fit_cpu(_paths(args.runs), _paths(args.calibrate_on) if args.calibrate_on else None,
                        engine=_engine(args))
    else:
        costs = fit_h100(args.decode_gpu, transfer_gb_per_s=args.transfer_gbps)
    print(json.dumps(costs.to_dict(), indent=1))
    if args.out:
        save_costs(costs, args.out)
        print(f"wrote {args.out}")
    print(f"({time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    costs = load_costs(args.costs)
    if args.contention is not None:  # measured apart (two engines side by side), not fitted: every run's
        prefill_c, _, decode_c = args.contention.partition(",")
        costs = replace(costs, contention=float(prefill_c), placement_contention={},
                        decode_contention=float(decode_c) if decode_c else None)
    if args.per_seq_ms is not None:  # another grid point: the same one-stream step, another slope
        d = costs.decode
        costs = replace(costs, decode=replace(d, fixed_ms=d.fixed_ms + d.per_seq_ms - args.per_seq_ms,
                                              per_seq_ms=args.per_seq_ms))
    rows = validate(_paths(args.runs), costs)
    print(format_rows(rows))
    within = [r for r in rows if abs(r.rel_err) <= 0.15]
    print(f"{len(within)} of {len(rows)} figures within 15%; "
          f"{sum(bool(r.in_band) for r in rows)} of {sum(r.band is not None for r in rows)} latency figures "
          f"inside their measured noise band ({time.perf_counter() - t0:.1f} s)")
    print("; ".join(counts(rows, k) for k in ("TTFT", "TPOT", "goodput")))
    for path in args.host_speed or []:
        factor, slow_rows = host_slowdown(path, load_costs(args.costs))
        print(f"\n{path} replayed on a host {factor:g}x slower:\n{format_rows(slow_rows)}")
    if args.plots:
        from bench.serving.sim_plots import plot_validation
        print(f"wrote {plot_validation(rows, args.plots)}")
    return 0


def cmd_crossval(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    compared = crossval(_paths(args.runs), engine=_engine(args))
    print(format_crossval(compared))
    print(f"({time.perf_counter() - t0:.1f} s)")
    if args.json_out:
        save_crossval(compared, args.json_out)
        print(f"wrote {args.json_out}")
    if args.plots:
        from bench.serving.sim_plots import plot_validation
        png = plot_validation([c.in_sample for c in compared], args.plots, [c.held_out for c in compared])
        print(f"wrote {png}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    costs, s = _costs(args), _settings(args)
    for mix in _mixes(args):
        best = search(args.gpus, costs, mix, s)
        for mode, f in best.items():
            print(f"{mix.name:<14} {mode:<7} {f.unit!s:<28} goodput {f.goodput:8.2f} req/s per unit, "
                  f"{f.per_gpu:6.2f} per GPU")
        for tp in s.tp_choices:
            b = work_bound(costs, mix, s, tp)
            print(f"{mix.name:<14} bound   TP{tp}: prefill {b.prefill_ms:.1f} + decode {b.decode_ms:.1f} "
                  f"GPU-ms a request (batch {b.batch}) -> at most {b.per_gpu:.2f} per GPU, "
                  f"{b.per_gpu / best['coloc'].per_gpu:.2f}x the colocated best")
        p, d, bound = best_bound(costs, mix, s)
        print(f"{mix.name:<14} bound   each role at its best TP: prefill {p.prefill_ms:.1f} (TP{p.tp}) + "
              f"decode {d.decode_ms:.1f} (TP{d.tp}) -> at most {bound:.2f} per GPU, "
              f"{bound / best['coloc'].per_gpu:.2f}x the colocated best")
    print(f"({time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_bound(args: argparse.Namespace) -> int:
    costs = load_costs(args.costs)
    for mix in _mixes(args):
        work = request_work(costs, mix)
        print(f"{mix.name}: prefill {work.prefill_s:.3f} s a request (mean over the prompts), decode "
              + ", ".join(f"{work.decode_s(b):.3f} s at batch {b}" for b in (1, 2, 4, 8, 16))
              + f", {work.fused_decode_s():.3f} s fused into prefill steps; TPOT SLO "
              f"{mix.slo.tpot * 1e3:.1f} ms allows batch {work.max_batch(mix.slo.tpot)}")
        found = bounds(work, mix.slo.tpot, args.workers, args.speed)
        for b in found:
            print(f"  {b.config:<52} <= {b.req_per_s:.3f} req/s ({b.why})")
        coloc_low, coloc_high, _, cond_slo, cond = found
        print(f"  conditional / colocated <= {cond_slo.req_per_s / coloc_low.req_per_s:.2f}x at the SLO's "
              f"largest batch, {cond.req_per_s / coloc_low.req_per_s:.2f}x at the batch its rate keeps "
              f"(against colocated decoding alone; {cond.req_per_s / coloc_high.req_per_s:.2f}x against "
              "fused)")
    return 0


def cmd_project(args: argparse.Namespace) -> int:
    costs, s = _costs(args), _settings(args)
    t0 = time.perf_counter()
    gpus = tuple(int(g) for g in args.gpus.split(","))
    projections = project(gpus, costs, _mixes(args), s)
    print(f"{'mix':<14} {'GPUs':>5} {'disaggregated unit':<22} {'req/s':>9} {'colocated unit':<24} "
          f"{'req/s':>9} {'gain':>6}")
    for p in projections:
        print(f"{p.mix:<14} {p.gpus:>5} {p.disagg.unit!s:<22} {p.cluster_goodput(p.disagg):>9.1f} "
              f"{p.coloc.unit!s:<24} {p.cluster_goodput(p.coloc):>9.1f} {p.gain:>5.2f}x")
    gains: dict[str, list[tuple[float, float]]] = {}
    for scale in args.slo_scales or []:
        for mix in _mixes(args):
            slo = Slo(mix.slo.ttft * scale, mix.slo.tpot * scale)
            best = search(min(gpus), costs, replace(mix, slo=slo), s)
            g = best["disagg"].per_gpu / best["coloc"].per_gpu if best["coloc"].per_gpu else float("inf")
            gains.setdefault(mix.name, []).append((scale, g))
            print(f"{mix.name:<14} SLO x{scale:<4g} (TTFT {slo.ttft * 1e3:.0f} ms, "
                  f"TPOT {slo.tpot * 1e3:.1f} ms): "
                  f"{best['disagg'].unit} {best['disagg'].per_gpu:.2f}/GPU vs {best['coloc'].unit} "
                  f"{best['coloc'].per_gpu:.2f}/GPU -> {g:.2f}x")
    print(f"({time.perf_counter() - t0:.1f} s)")
    if args.json_out:
        args.json_out.write_text(json.dumps({
            "settings": asdict(s), "mixes": {m.name: {"prompt": str(m.prompt), "output": str(m.output),
                                                      "slo": asdict(m.slo)} for m in _mixes(args)},
            "projections": [{"gpus": p.gpus, "mix": p.mix, "gain": p.gain,
                             **{mode: {"unit": str(f.unit), "unit_goodput": f.goodput,
                                       "cluster_goodput": p.cluster_goodput(f), "per_gpu": f.per_gpu}
                                for mode, f in (("disagg", p.disagg), ("coloc", p.coloc))}}
                            for p in projections],
            "slo_scale_gain": gains}, indent=1) + "\n")
        print(f"wrote {args.json_out}")
    if args.plots:
        from bench.serving.sim_plots import plot_projection, plot_slo_gain
        print(f"wrote {plot_projection(projections, args.plots)}")
        if gains:
            print(f"wrote {plot_slo_gain(gains, args.plots)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.serving.sim", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit", help="fit step costs and write them as JSON")
    f.add_argument("target", choices=("cpu", "h100"))
    f.add_argument("--runs", nargs="+", default=[CPU_RUNS], help="cpu: pdserve bench --json files")
    f.add_argument("--calibrate-on", nargs="+", default=None,
                   help="cpu: the runs the grid is scored on (default: all of --runs); each placement kind "
                        "(pinned or not, bench/serving/sim_host.py) gets the contention its own runs fit")
    f.add_argument("--engine", default=ENGINE_STEPS, metavar="JSON",
                   help="cpu: prefill's cost and the decode slope from the engine timed alone "
                        "(bench.serving.sim_engine --json); 'none': both by the grid")
    f.add_argument("--decode-gpu", default="bench/results/decode_gpu.json",
                   help="h100: bench.engine.decode_gpu's JSON")
    f.add_argument("--transfer-gbps", type=float, default=25.0, help="h100: KV link GB/s per GPU (assumed)")
    f.add_argument("--out", type=Path, default=None)
    f.set_defaults(func=cmd_fit)
    v = sub.add_parser("validate", help="replay the measured runs; sim vs measured")
    v.add_argument("--costs", default=CPU_COSTS)
    v.add_argument("--runs", nargs="+", default=[CPU_RUNS])
    v.add_argument("--plots", type=Path, default=None)
    v.add_argument("--contention", default=None, metavar="PREFILL[,DECODE]",
                   help="replay every run with this host sharing instead of the costs file's (which is per "
                        "placement kind: pinned or not): a step's slowdown per other busy worker, a decode "
                        "step's after the comma")
    v.add_argument("--per-seq-ms", type=float, default=None,
                   help="replay with this decode ms per stream instead, the one-stream step kept")
    v.add_argument("--host-speed", nargs="+", default=None, metavar="JSON",
                   help="single runs to also replay with the one host slowdown factor that fits each best")
    v.set_defaults(func=cmd_validate)
    x = sub.add_parser("crossval", help="fit on every run and on each leave-one-file-out split; "
                       "in-sample and held-out errors per figure")
    x.add_argument("--runs", nargs="+", default=[CPU_RUNS])
    x.add_argument("--json", type=Path, default=None, dest="json_out")
    x.add_argument("--engine", default=ENGINE_STEPS, metavar="JSON", help="as for fit cpu")
    x.add_argument("--plots", type=Path, default=None, help="writes sim_validation.png, held-out hollow")
    x.set_defaults(func=cmd_crossval)
    for name, func, gpus in (("search", cmd_search, "8"), ("project", cmd_project, "8,64,512")):
        s = sub.add_parser(name, help="best P:D x TP unit per mix" if name == "search" else
                           "disaggregated vs colocated goodput at several GPU counts")
        s.add_argument("--costs", default=H100_COSTS)
        s.add_argument("--gpus", type=int if name == "search" else str, default=int(gpus) if name == "search"
                       else gpus)
        s.add_argument("--mix", default=",".join(MIXES), help=f"comma-separated: {', '.join(MIXES)}")
        s.add_argument("--slo-ttft", type=float, default=None, help="seconds (default: the mix's)")
        s.add_argument("--slo-tpot", type=float, default=None, help="seconds (default: the mix's)")
        s.add_argument("--tp", default="1,2", help="TP degrees each role may use (powers of two)")
        s.add_argument("--tp-efficiency", type=float, default=0.9, help="per doubling of TP")
        s.add_argument("--max-num-seqs", type=int, default=SearchSettings.max_num_seqs,
                       help="decode batch cap per worker (default: the largest CUDA graph bucket)")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--arrival", choices=("poisson", "constant"), default="poisson")
        s.add_argument("--unit-max", type=int, default=SearchSettings.unit_max_gpus,
                       help="the most GPUs (CPU: one-core workers) one unit spans")
        s.add_argument("--coloc-fused", default=None, metavar="X,...",
                       help="split-fused credits colocated units try, 0 = off (default 0,1.5)")
        s.add_argument("--cpu-units", action="store_true",
                       help="also colocated units of the whole unit's workers (one router over them) and "
                            "conditional units (cost placement, credit from --coloc-fused)")
        s.add_argument("--host-contention", type=float, default=1.0, metavar="K",
                       help="scale the costs' host sharing (contention) by K; 0 = every worker on cores "
                            "of its own")
        s.set_defaults(func=func)
    b = sub.add_parser("bound", help="capacity bounds of colocated, 1P+ND and conditional on N workers")
    b.add_argument("--costs", default=CPU_COSTS)
    b.add_argument("--mix", default="cpu-prefill-heavy", help=f"comma-separated: {', '.join(MIXES)}")
    b.add_argument("--slo-ttft", type=float, default=None, help="seconds (default: the mix's)")
    b.add_argument("--slo-tpot", type=float, default=None, help="seconds (default: the mix's)")
    b.add_argument("--workers", type=int, default=2, help="one core each")
    b.add_argument("--speed", type=float, default=1.0,
                   help="each worker's speed against the engine alone (the host's sharing, the router's CPU)")
    b.set_defaults(func=cmd_bound)
    pr = sub.choices["project"]
    pr.add_argument("--slo-scales", type=lambda t: [float(x) for x in t.split(",")], default=None,
                    metavar="X,...", help="also the gain with both SLOs scaled by each X (fewest GPUs)")
    pr.add_argument("--json", type=Path, default=None, dest="json_out")
    pr.add_argument("--plots", type=Path, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"sim: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
