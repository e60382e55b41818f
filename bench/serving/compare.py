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

from bench.serving.run import build_parser as bench_parser
from bench.serving.run import run as bench_run

REPO = Path(__file__).resolve().parents[2]
_HIT_RATIO = re.compile(r'^pdserve_prefix_cache_hit_ratio\{[^}]*worker="([^"]+)"[^}]*\} ([0-9.eE+-]+)$', re.M)


def _start(flags: list[str], workdir: Path) -> tuple[subprocess.Popen, dict, Path]:
    ready, log = workdir / "ready.json", workdir / "up.log"
    cmd = [sys.executable, "-m", "deploy.cli", "up", "--port", "0", "--metrics-port", "0", "--http-port", "0",
           "--admin-port", "0", "--ready-file", str(ready), *flags]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 600
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            raise RuntimeError(f"pdserve up {' '.join(flags)} did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    info = json.loads(ready.read_text())
    with grpc.insecure_channel(info["address"]) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return proc, info, log
            except grpc.RpcError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                _stop(proc)
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


def _hit_ratios(metrics_url: str) -> dict[str, float]:
    try:
        text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    except OSError:
        return {}
    return {worker: float(value) for worker, value in _HIT_RATIO.findall(text)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pdserve bench compare", description="Start each configuration with "
                                "`pdserve up` (free ports), run the same `pdserve bench` load against it, "
                                "stop it; then print the summaries side by side and the ratios to the first.")
    p.add_argument("--up", action="append", required=True, metavar="'LABEL: FLAGS'",
                   help="a configuration: its label, a colon, then `pdserve up` flags; give it twice or more")
    p.add_argument("--json", type=Path, default=None, dest="json_out")
    args, load = p.parse_known_args(argv)
    configs = [(label.strip(), shlex.split(flags)) for label, _, flags in (u.partition(":") for u in args.up)]
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    results = []
    for label, flags in configs:
        with tempfile.TemporaryDirectory(prefix="pdserve-compare-") as tmp:
            t0 = time.monotonic()
            proc, info, _ = _start(flags, Path(tmp))
            print(f"--- {label}: pdserve up {' '.join(flags)} (serving after {time.monotonic() - t0:.0f} s)",
                  flush=True)
            try:
                bench_args = bench_parser().parse_args([*load, "--address", info["address"],
                                                        "--label", label])
                result = bench_run(bench_args)
                result["up_flags"] = flags
                result["prefix_cache_hit_ratio"] = _hit_ratios(info["metrics_url"])
            finally:
                _stop(proc)
        results.append(result)
    print(format_comparison(results))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json_out}")
    return 0


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
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
