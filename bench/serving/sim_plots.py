"""The simulator's PNGs: sim vs measured on CPU, goodput per GPU by mix, the gain against the SLO scale."""
from __future__ import annotations

from pathlib import Path

from bench.serving.report import _pyplot
from bench.serving.sim_search import Projection
from bench.serving.sim_validate import Row

DPI = 80  # small committed PNGs


def plot_validation(rows: list[Row], out: Path, held_out: list[Row] | None = None) -> Path:
    """Measured against simulated for every latency percentile of every run (log axes, y = x dashed);
    held-out simulations (each fitted without its run), when given, as hollow markers of the same shape."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for i, (metric, marker) in enumerate((("TTFT p50 ms", "o"), ("TTFT p90 ms", "s"), ("TPOT p50 ms", "^"),
                                          ("TPOT p90 ms", "v"))):
        pts = [(r.measured, r.simulated) for r in rows if r.metric == metric]
        ax.scatter([m for m, _ in pts], [s for _, s in pts], marker=marker, color=f"C{i}", label=metric)
        held = [(r.measured, r.simulated) for r in held_out or [] if r.metric == metric]
        if held:
            ax.scatter([m for m, _ in held], [s for _, s in held], marker=marker, facecolors="none",
                       edgecolors=f"C{i}", label=f"{metric}, held out")
    every = [r for r in rows + (held_out or []) if r.metric.endswith("ms")]
    lo = min(min(r.measured, r.simulated) for r in every)
    hi = max(max(r.measured, r.simulated) for r in every)
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.fill_between([lo, hi], [lo * 0.85, hi * 0.85], [lo * 1.15, hi * 1.15], color="grey", alpha=0.15,
                    label="within 15%")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured (ms)")
    ax.set_ylabel("simulated (ms)")
    ax.set_title("simulator vs pdserve bench, 2-core CPU, 1P+1D")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, plt, out / "sim_validation.png")


def plot_projection(projections: list[Projection], out: Path) -> Path:
    """Goodput per GPU, disaggregated vs colocated, per mix and GPU count, with the gain over each pair."""
    plt = _pyplot()
    mixes = list(dict.fromkeys(p.mix for p in projections))
    fig, axes = plt.subplots(1, len(mixes), figsize=(5 * len(mixes), 4), squeeze=False)
    for ax, mix in zip(axes[0], mixes, strict=True):
        ps = [p for p in projections if p.mix == mix]
        xs = range(len(ps))
        dis = [p.cluster_goodput(p.disagg) / p.gpus for p in ps]
        col = [p.cluster_goodput(p.coloc) / p.gpus for p in ps]
        ax.bar([x - 0.2 for x in xs], dis, 0.4, label="disaggregated")
        ax.bar([x + 0.2 for x in xs], col, 0.4, label="colocated")
        for x, p, d, c in zip(xs, ps, dis, col, strict=True):
            ax.annotate(f"{p.gain:.2f}x", (x, max(d, c)), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs), [f"{p.gpus} GPUs\n{p.disagg.unit}\n{p.coloc.unit}" for p in ps], fontsize=6)
        ax.set_ylabel("goodput per GPU (req/s)")
        ax.set_title(f"{mix} (gain = disaggregated / colocated)")
        ax.set_ylim(0, 1.2 * max(dis + col))
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(alpha=0.3, axis="y")
    return _save(fig, plt, out / "sim_projection.png")


def plot_slo_gain(points: dict[str, list[tuple[float, float]]], out: Path) -> Path:
    """Disaggregated / colocated goodput per GPU against the SLO scale (both SLOs x it), one line per mix."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for mix, pts in points.items():
        ax.plot([x for x, _ in pts], [g for _, g in pts], "-o", label=mix)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel("SLO scale (x the mix's TTFT and TPOT SLOs)")
    ax.set_ylabel("disaggregated / colocated goodput per GPU")
    ax.set_title("where disaggregation wins (Llama-3-8B, H100 step costs)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, plt, out / "sim_slo_gain.png")


def _save(fig, plt, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
