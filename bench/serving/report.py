"""Prints a run's summary, and draws latency-vs-rate and goodput-per-label PNGs from the harness's JSON."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PLOT_HINT = "install matplotlib for plots (it is pinned in requirements.txt: pip install -r requirements.txt)"


def _ms(dist: dict | None, key: str) -> str:
    return f"{dist[key] * 1000:8.1f}" if dist else "       -"


def format_summary(s: dict) -> str:
    """A few aligned lines: counts, throughput, TTFT/TPOT/e2e percentiles in ms, SLO attainment."""
    lines = [f"requests {s['requests']} (ok {s['ok']}, not sent {s['not_sent']}) in {s['duration_s']:.1f} s; "
             f"statuses {s['statuses']}",
             f"throughput {s['request_throughput']:.2f} req/s, "
             f"{s['output_token_throughput']:.1f} output tok/s",
             f"{'ms':>6} {'p50':>8} {'p90':>8} {'p99':>8} {'mean':>8}"]
    for name in ("ttft", "tpot", "e2e"):
        d = s[f"{name}_s"]
        lines.append(f"{name:>6} " + " ".join(_ms(d, k) for k in ("p50", "p90", "p99", "mean")))
    if s["slo"]:
        att, slo = s["slo_attainment"], s["slo"]
        judged = f"{att:.1%} of {s['slo_judged']} judged requests" if att is not None else "none judged"
        lines.append(f"SLO (TTFT <= {slo['ttft'] * 1000:.0f} ms, "
                     f"TPOT <= {slo['tpot'] * 1000:.0f} ms): {judged}")
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError(PLOT_HINT) from None
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    return plt


def _points(result: dict) -> list[tuple[float, dict]]:
    if result.get("sweep"):
        return sorted((p["rate"], p["summary"]) for p in result["sweep"]["probes"])
    return [(result["rate"], result["run"])] if result.get("rate") else []


def plot_latency_vs_rate(results: list[dict], out: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("ttft_s", "tpot_s"), strict=True):
        for result in results:
            pts = [(rate, s[metric]) for rate, s in _points(result) if s[metric]]
            for q, style in (("p50", "-o"), ("p90", "--s"), ("p99", ":^")):
                ax.plot([r for r, _ in pts], [d[q] * 1000 for _, d in pts], style,
                        label=f"{result['label']} {q}")
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(f"{metric[:-2].upper()} (ms)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_goodput(results: list[dict], out: Path) -> None:
    swept = [r for r in results if r.get("sweep")]
    if not swept:
        raise ValueError("goodput bars need at least one result run with --sweep")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.6 * len(swept) + 2, 4))
    bars = ax.bar([r["label"] for r in swept], [r["sweep"]["goodput_rps"] for r in swept])
    ax.bar_label(bars, fmt="%.2f")
    target = swept[0]["sweep"]["target"]
    ax.set_ylabel(f"goodput (req/s, {target:.0%} within SLO)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def write_plots(results: list[dict], out_dir: Path) -> list[Path]:
    """latency_vs_rate.png always; goodput.png when any result carries a sweep. Returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "latency_vs_rate.png"]
    plot_latency_vs_rate(results, written[0])
    if any(r.get("sweep") for r in results):
        written.append(out_dir / "goodput.png")
        plot_goodput(results, written[1])
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serving.report",
                                     description="Plot several `pdserve bench --json` results side by side "
                                                 "(one goodput bar per --label).")
    parser.add_argument("results", nargs="+", type=Path, help="JSON files written by pdserve bench --json")
    parser.add_argument("--plots", type=Path, required=True, help="directory for the PNGs")
    args = parser.parse_args(argv)
    results = [json.loads(p.read_text()) for p in args.results]
    try:
        for path in write_plots(results, args.plots):
            print(path)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
