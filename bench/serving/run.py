"""`pdserve bench` / `python -m bench.serving.run`: one bounded load run, or a goodput sweep over rates."""
from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

from bench.serving.arrivals import ARRIVALS, arrival_offsets
from bench.serving.client import RunLimits, run_load
from bench.serving.goodput import find_goodput
from bench.serving.loopback import NonLoopbackTarget, check_loopback
from bench.serving.metrics import Slo, summarize
from bench.serving.report import PLOT_HINT, format_summary, write_plots
from bench.serving.trace import TraceError, load_trace
from bench.serving.workload import SharedPrefix, WorkloadSpec, parse_length, synthesize


def _arg(parse):
    """argparse keeps an ArgumentTypeError's message (a plain ValueError becomes 'invalid value')."""
    def wrapped(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return wrapped


def _positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):  # nan compares false both ways: refuse it by name
        raise ValueError(f"must be a finite number > 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise ValueError(f"must be in (0, 1], got {text}")
    return value


def _readable_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise ValueError(f"no such file: {text}")
    return path


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be >= 1, got {text}")
    return value


def _ints(n: int, what: str):
    def parse(text: str) -> tuple[int, ...]:
        parts = tuple(int(x) for x in text.split(":"))
        if len(parts) != n or min(parts) < 1:
            raise ValueError(f"expected {what} (whole numbers >= 1), got {text!r}")
        return parts
    return parse


def _rate_range(text: str) -> tuple[float, float]:
    low, _, high = text.partition(":")
    lo, hi = float(low), float(high)
    if not 0 < lo < hi:
        raise ValueError(f"expected LOW:HIGH req/s with 0 < LOW < HIGH, got {text!r}")
    return lo, hi


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdserve bench", description="Load a running cluster over its gRPC "
                                "API (loopback only) and report TTFT/TPOT/e2e percentiles, throughput and "
                                "goodput. Other modes: `pdserve bench router-overhead|batching|fused|compare "
                                "--help`.")
    p.add_argument("--address", default="127.0.0.1:50051", help="router gRPC address (loopback only)")
    p.add_argument("--label", default="run", help="configuration name in the JSON and the goodput bars")
    load = p.add_argument_group("load")
    load.add_argument("--rate", type=_arg(_positive_float), default=1.0,
                      help="requests/s of a single run (default 1)")
    load.add_argument("--arrival", choices=ARRIVALS, default="poisson")
    load.add_argument("--trace", type=_arg(_readable_file), default=None,
                      help="JSONL trace ({t, prompt_ids|text, max_tokens} a line): "
                           "replaces rate and workload")
    load.add_argument("--num-requests", type=_arg(_positive_int), default=100,
                      help="requests per run, warm-up included (default 100)")
    load.add_argument("--duration", type=_arg(_positive_float), default=60.0,
                      help="hard stop per run in seconds: nothing is sent after it, open streams are "
                           "cancelled (default 60)")
    load.add_argument("--warmup", type=int, default=0, help="first N requests left out of the stats")
    wl = p.add_argument_group("workload")
    wl.add_argument("--prompt-len", type=_arg(parse_length),
                    default=parse_length("fixed:128"),
                    help="fixed:N | uniform:LOW:HIGH | chat:MEDIAN:MAX (default fixed:128); with "
                         "--shared-prefix, the per-user part")
    wl.add_argument("--output-len", type=_arg(parse_length), default=parse_length("fixed:64"),
                    help="same forms (default fixed:64); EOS is ignored so each request streams this many")
    wl.add_argument("--shared-prefix", type=_arg(_ints(3, "SYSTEMS:USERS:PREFIX_TOKENS")),
                    default=None, help="N system prompts of PREFIX_TOKENS tokens x M users each")
    wl.add_argument("--seed", type=int, default=0, help="workload and arrival seed (default 0)")
    slo = p.add_argument_group("SLO and goodput")
    slo.add_argument("--slo-ttft", type=_arg(_positive_float), default=None, help="seconds")
    slo.add_argument("--slo-tpot", type=_arg(_positive_float), default=None, help="seconds")
    slo.add_argument("--slo-target", type=_arg(_fraction), default=0.9,
                     help="share of requests that must meet both SLOs for goodput (default 0.9)")
    slo.add_argument("--sweep", type=_arg(_rate_range), default=None, metavar="LOW:HIGH",
                     help="bisect request rates in [LOW, HIGH] for goodput; each probe is one bounded run")
    slo.add_argument("--sweep-probes", type=_arg(_positive_int), default=8,
                     help="most probes a sweep runs (default 8)")
    slo.add_argument("--sweep-tol", type=_arg(_fraction), default=0.1,
                     help="stop when the pass/fail rates are within this fraction (default 0.1)")
    out = p.add_argument_group("output")
    out.add_argument("--json", type=Path, default=None, dest="json_out", help="write the full result here")
    out.add_argument("--plots", type=Path, default=None, help="directory for the PNGs")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _workload(args: argparse.Namespace, rate: float) -> tuple[list[float], list]:
    if args.trace is not None:
        return load_trace(args.trace)
    sp = SharedPrefix(*args.shared_prefix) if args.shared_prefix else None
    spec = WorkloadSpec(num_requests=args.num_requests, prompt_len=args.prompt_len,
                        output_len=args.output_len, seed=args.seed, shared_prefix=sp)
    return arrival_offsets(args.arrival, rate, spec.num_requests, args.seed), synthesize(spec)


class RouterUnreachable(RuntimeError):
    """Every request of a run failed UNAVAILABLE: nothing listens at the address, or no worker behind it is
    ready (an empty table and exit 0 read as a run that measured nothing wrong)."""

    def __init__(self, address: str) -> None:
        super().__init__(f"every request failed UNAVAILABLE: the router at {address} is unreachable or "
                         "has no worker ready (is `pdserve up` running?)")


def _run_at(args: argparse.Namespace, rate: float, slo: Slo | None) -> dict:
    offsets, requests = _workload(args, rate)
    limits = RunLimits(max_seconds=args.duration, warmup=args.warmup, progress=not args.no_progress)
    result = asyncio.run(run_load(args.address, offsets, requests, limits))
    if result.records and all(r.status == "UNAVAILABLE" for r in result.records):
        raise RouterUnreachable(args.address)
    summary = summarize(result.records, result.not_sent, slo).to_dict()
    return {"rate": rate, "wall_seconds": result.wall_seconds, "summary": summary,
            "records": [asdict(r) for r in result.records]}


def run(args: argparse.Namespace) -> dict:
    """Runs what the flags ask for and returns the JSON-ready result (printing the summaries as it goes)."""
    check_loopback(args.address)
    slo = Slo(args.slo_ttft, args.slo_tpot) if args.slo_ttft and args.slo_tpot else None
    if not 0 <= args.warmup < args.num_requests:
        raise ValueError(f"--warmup must be in [0, --num-requests), got {args.warmup}")
    if (args.slo_ttft is None) != (args.slo_tpot is None) or (args.sweep and slo is None):
        raise ValueError("give both --slo-ttft and --slo-tpot (--sweep needs them)")
    config = {k: str(v) if isinstance(v, Path) or hasattr(v, "kind") else v for k, v in vars(args).items()}
    out: dict = {"label": args.label, "config": config, "rate": None, "run": None, "records": None,
                 "sweep": None}
    if args.sweep is None:
        single = _run_at(args, args.rate, slo)
        print(format_summary(single["summary"]))
        out.update(rate=None if args.trace else args.rate, run=single["summary"], records=single["records"])
        return out
    probes: list[dict] = []

    def attainment_at(rate: float) -> float:
        probe = _run_at(args, rate, slo)
        probes.append(probe)
        att = probe["summary"]["slo_attainment"]
        print(f"--- {rate:.3f} req/s: {'-' if att is None else f'{att:.1%}'} within SLO\n"
              + format_summary(probe["summary"]))
        return 0.0 if att is None else att

    found = find_goodput(attainment_at, *args.sweep, target=args.slo_target, rel_tol=args.sweep_tol,
                         max_probes=args.sweep_probes)
    print(f"goodput {found.rate:.3f} req/s at >= {args.slo_target:.0%} within SLO ({found.bound})")
    out["sweep"] = {"target": args.slo_target, "goodput_rps": found.rate, "bound": found.bound,
                    "probes": [{"rate": p["rate"], "attainment": p["summary"]["slo_attainment"],
                                "summary": p["summary"], "records": p["records"]} for p in probes]}
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    modes = {"router-overhead": "router_overhead", "batching": "batching", "fused": "fused",
             "compare": "compare"}
    if argv[:1] and argv[0] in modes:  # the other measurements; each module's --help says what it does
        module = importlib.import_module(f"bench.serving.{modes[argv[0]]}")
        return module.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.trace is not None and args.sweep:
        parser.error("--trace replays its own arrival times: it cannot be swept over rates")
    try:
        result = run(args)
    except (NonLoopbackTarget, TraceError, ValueError) as e:
        print(f"pdserve bench: error: {e}", file=sys.stderr)
        return 2
    except RouterUnreachable as e:
        print(f"pdserve bench: error: {e}", file=sys.stderr)
        return 1
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json_out}")
    if args.plots:
        try:
            for path in write_plots([result], args.plots):
                print(f"wrote {path}")
        except RuntimeError:
            print(f"pdserve bench: --plots: {PLOT_HINT}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
