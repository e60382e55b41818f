"""`pdserve bench compare`: one load against several `pdserve up` configurations, one after another."""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.serving.metrics import Slo
from bench.serving.run import build_parser as bench_parser
from bench.serving.run import run as bench_run
from bench.serving.slo_rule import SloScale, measure_single_requests, slo_misses
from bench.serving.workload import SharedPrefix, WorkloadSpec, synthesize

REPO = Path(__file__).resolve().parents[2]
_HIT_RATIO = re.compile(r'^pdserve_prefix_cache_hit_ratio\{[^}]*worker="([^"]+)"[^}]*\} ([0-9.eE+-]+)$', re.M)
_PLACEMENT = re.compile(r'^pdserve_prefill_placement_total\{([^}]*)\} ([0-9.eE+-]+)$', re.M)


def _start(flags: list[str], workdir: Path) -> tuple[subprocess.Popen, dict, Path]:
    ready, log = workdir / "ready.json", workdir / "up.log"
    cmd = [sys.executable, "-m", "deploy.cli", "up", "--port", "0", "--metrics-port", "0", "--http-port", "0",
           "--admin-port", "0", "--ready-file", str(ready), *flags]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        return proc, _wait_serving(proc, flags, ready, log), log
    except BaseException:  # Ctrl-C while it loads too: its own session would outlive this process
        _stop(proc)
        raise


def _wait_serving(proc: subprocess.Popen, flags: list[str], ready: Path, log: Path) -> dict:
    deadline = time.monotonic() + 600
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"pdserve up {' '.join(flags)} did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    info = json.loads(ready.read_text())
    with grpc.insecure_channel(info["address"]) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return info
            except grpc.RpcError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pdserve up {' '.join(flags)} never served:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)


def _stop(proc: subprocess.Popen) -> None:
    """Ctrl-C, as an operator stops it; its whole session (Ray included) is killed if that hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _scrape(metrics_url: str) -> str:
    try:
        return urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    except OSError:
        return ""


def _hit_ratios(text: str) -> dict[str, float]:
    return {worker: float(value) for worker, value in _HIT_RATIO.findall(text)}


def placements(text: str) -> dict[str, int]:
    """The run's prompts by where they were prefilled and why ("local/cheaper": n), warm-up and every probe
    together: the counter lives as long as the cluster, which the harness stops after the load."""
    out = {}
    for labels, value in _PLACEMENT.findall(text):
        kv = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        out[f"{kv.get('where', '?')}/{kv.get('reason', '?')}"] = int(float(value))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pdserve bench compare", description="Start each configuration with "
                                "`pdserve up` (free ports), run the same `pdserve bench` load against it, "
                                "stop it; then print the summaries side by side and the ratios to the first.")
    p.add_argument("--up", action="append", required=True, metavar="'LABEL: FLAGS'",
                   help="a configuration: its label, a colon, then `pdserve up` flags; give it twice or more")
    p.add_argument("--slo-scale", type=SloScale.parse, default=None, metavar="TTFT_X:TPOT_X",
                   help="SLOs from single requests (DistServe's way): before its load, the first "
                        "configuration serves --calibration-requests requests of the workload one at a time; "
                        "TTFT SLO = "
                        "TTFT_X x their median TTFT, TPOT SLO = TPOT_X x their median TPOT, for every "
                        "configuration (replaces --slo-ttft/--slo-tpot)")
    p.add_argument("--calibration-requests", type=int, default=5,
                   help="single requests measured for --slo-scale, after one warm-up (default 5)")
    p.add_argument("--json", type=Path, default=None, dest="json_out")
    args, load = p.parse_known_args(argv)
    configs = [(label.strip(), shlex.split(flags)) for label, _, flags in (u.partition(":") for u in args.up)]
    probe_args = bench_parser().parse_args(load)
    if args.slo_scale and (probe_args.slo_ttft or probe_args.slo_tpot):
        p.error("--slo-scale sets the SLOs: leave out --slo-ttft/--slo-tpot")
    w = probe_args
    print(f"load average {_load()} on {os.cpu_count()} cores; workload: prompts {w.prompt_len}, outputs "
          f"{w.output_len}, {w.arrival} arrivals, {w.num_requests} requests ({w.warmup} warm-up) a run, at "
          f"most {w.duration:g} s; goodput = highest rate with >= {w.slo_target:.0%} within both SLOs")
    results, calibration = [], None
    for label, flags in configs:
        with tempfile.TemporaryDirectory(prefix="pdserve-compare-") as tmp:
            t0 = time.monotonic()
            proc, info, _ = _start(flags, Path(tmp))
            print(f"--- {label}: pdserve up {' '.join(flags)} (serving after {time.monotonic() - t0:.0f} s, "
                  f"load average {_load()})", flush=True)
            try:
                if args.slo_scale and calibration is None:
                    calibration = _calibrate(info["address"], probe_args, args.slo_scale,
                                             args.calibration_requests)
                    load += ["--slo-ttft", f"{calibration['slo_ttft_s']:.6f}",
                             "--slo-tpot", f"{calibration['slo_tpot_s']:.6f}"]
                bench_args = bench_parser().parse_args([*load, "--address", info["address"],
                                                        "--label", label])
                result = bench_run(bench_args)
                result["up_flags"] = flags
                metrics = _scrape(info["metrics_url"])
                result["prefix_cache_hit_ratio"] = _hit_ratios(metrics)
                result["prefill_placements"] = placements(metrics)
                print(f"{label} prefill placements: " + (", ".join(
                    f"{k} {v}" for k, v in sorted(result["prefill_placements"].items())) or "-"), flush=True)
                result["load_average"] = os.getloadavg()
            finally:
                _stop(proc)
        results.append(result)
    print(format_comparison(results))
    if calibration:
        results[0]["slo_calibration"] = calibration
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json_out}")
    return 0


def _load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def _calibrate(address: str, load: argparse.Namespace, scale: SloScale, n: int) -> dict:
    """The SLOs for every configuration, from lone requests of the workload (another seed: no cache hits)."""
    sp = SharedPrefix(*load.shared_prefix) if load.shared_prefix else None
    spec = WorkloadSpec(num_requests=n + 1, prompt_len=load.prompt_len, output_len=load.output_len,
                        seed=load.seed + 1, shared_prefix=sp)
    costs = measure_single_requests(address, synthesize(spec), warmup=1)
    slo = costs.slo(scale)
    print(f"SLO rule: TTFT <= {scale.ttft_x:g} x single-request TTFT ({costs.ttft_s * 1e3:.0f} ms) = "
          f"{slo.ttft * 1e3:.0f} ms; TPOT <= {scale.tpot_x:g} x single-request TPOT "
          f"({costs.tpot_s * 1e3:.1f} ms, pure decode) = {slo.tpot * 1e3:.1f} ms (medians of "
          f"{costs.requests} requests sent one at a time)", flush=True)
    return {"ttft_x": scale.ttft_x, "tpot_x": scale.tpot_x, "single_ttft_s": costs.ttft_s,
            "single_tpot_s": costs.tpot_s, "requests": costs.requests, "slo_ttft_s": slo.ttft,
            "slo_tpot_s": slo.tpot}


def format_misses(results: list[dict]) -> str:
    """Per configuration and probe: attainment and which SLO the misses broke."""
    lines = []
    for r in results:
        probes = r["sweep"]["probes"] if r["sweep"] else [{"rate": r["rate"], "summary": r["run"],
                                                           "records": r["records"]}]
        for probe in probes:
            s = probe["summary"]
            if not s.get("slo"):
                continue
            misses = slo_misses(probe["records"], Slo(**s["slo"]))
            att = s["slo_attainment"]
            lines.append(f"{r['label']} at {probe['rate']:.3f} req/s (served {s['request_throughput']:.2f}): "
                         f"{'-' if att is None else f'{att:.0%}'} within SLO; {misses.describe()}")
    return "\n".join(lines)


def _summary(result: dict) -> dict:
    """A single run's summary, or a sweep's probe nearest its goodput."""
    if result["run"]:
        return result["run"]
    sweep = result["sweep"]
    return min(sweep["probes"], key=lambda p: abs(p["rate"] - sweep["goodput_rps"]))["summary"]


def format_comparison(results: list[dict]) -> str:
    lines = ["| config | goodput req/s | req/s | tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | within SLO "
             "| prefix hit ratio |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        s, sweep = _summary(r), r["sweep"]
        ttft, tpot = s.get("ttft_s") or {}, s.get("tpot_s") or {}

        def ms(d: dict, q: str) -> str:
            return "-" if d.get(q) is None else f"{d[q] * 1e3:.0f}"

        att = s.get("slo_attainment")
        hits = ", ".join(f"{w} {v:.2f}" for w, v in sorted(r["prefix_cache_hit_ratio"].items())) or "-"
        goodput = "-" if not sweep else f"{sweep['goodput_rps']:.3f}"
        lines.append(f"| {r['label']} | {goodput} | "
                     f"{s.get('request_throughput', 0):.2f} | {s.get('output_token_throughput', 0):.1f} | "
                     f"{ms(ttft, 'p50')} / {ms(ttft, 'p99')} | {ms(tpot, 'p50')} / {ms(tpot, 'p99')} | "
                     f"{'-' if att is None else f'{att:.0%}'} | {hits} |")
    base = results[0]
    for r in results[1:]:
        parts = []
        if base["sweep"] and r["sweep"] and base["sweep"]["goodput_rps"]:
            parts.append(f"goodput {r['sweep']['goodput_rps'] / base['sweep']['goodput_rps']:.2f}x")
        b, s = _summary(base), _summary(r)
        for key, name in (("ttft_s", "TTFT p50"), ("tpot_s", "TPOT p99")):
            q = "p50" if name.endswith("p50") else "p99"
            if (b.get(key) or {}).get(q) and (s.get(key) or {}).get(q):
                parts.append(f"{name} {s[key][q] / b[key][q]:.2f}x")
        lines.append(f"{r['label']} / {base['label']}: " + ", ".join(parts))
    misses = format_misses(results)
    return "\n".join(lines) + ("\n" + misses if misses else "")


if __name__ == "__main__":
    sys.exit(main())
