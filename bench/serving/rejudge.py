"""`python -m bench.serving.rejudge`: a compare run's probes judged again at other TPOT SLOs."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.serving.client import RequestRecord
from bench.serving.metrics import Slo, meets_slo


def attainment(records: list[dict], slo: Slo) -> float:
    """The share of judged requests within both objectives (the harness's rule: warm-ups and requests the
    hard stop cut before they could miss are not judged)."""
    verdicts = [v for v in (meets_slo(RequestRecord(**r), slo) for r in records if not r["warmup"])
                if v is not None]
    return sum(verdicts) / len(verdicts) if verdicts else 0.0


def rejudged_goodput(result: dict, slo: Slo, target: float) -> float:
    """The highest probed rate that meets `target` with every lower probe meeting it too; 0 if the lowest
    fails. Coarse: the probes sit where the run's own bisection, at its own SLO, put them."""
    best = 0.0
    for probe in sorted(result["sweep"]["probes"], key=lambda p: p["rate"]):
        if attainment(probe["records"], slo) < target:
            break
        best = probe["rate"]
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serving.rejudge", description=__doc__)
    p.add_argument("json", type=Path, help="pdserve bench compare --json output (sweeps)")
    p.add_argument("--tpot", required=True, help="comma-separated TPOT SLOs, seconds")
    p.add_argument("--ttft", type=float, default=None, help="TTFT SLO, seconds (default: the run's)")
    p.add_argument("--target", type=float, default=None, help="default: the run's")
    args = p.parse_args(argv)
    results = json.loads(args.json.read_text())
    cfg = results[0]["config"]
    ttft, target = args.ttft or cfg["slo_ttft"], args.target or cfg["slo_target"]
    for tpot in (float(x) for x in args.tpot.split(",")):
        found = [(r["label"], rejudged_goodput(r, Slo(ttft, tpot), target)) for r in results]
        base = found[0][1]
        print(f"TPOT {tpot * 1e3:.1f} ms, TTFT {ttft * 1e3:.0f} ms: " + "; ".join(
            f"{label} {g:.3f}" + (f" ({g / base:.2f}x)" if base and i else "")
            for i, (label, g) in enumerate(found)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
