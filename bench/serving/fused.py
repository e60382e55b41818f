"""`pdserve bench fused`: p99 TPOT of a mixed load vs a pure-decode load on one cluster, back to back."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from bench.serving.run import build_parser as bench_parser
from bench.serving.run import run as bench_run

GOAL_RATIO = 1.5  # issue 14: split-fused p99 TPOT <= 1.5x pure-decode p99 TPOT


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pdserve bench fused", description="Run the same `pdserve bench` load "
                                "twice against --address, first with short prompts (pure decode), then with "
                                "--mixed-prompt-len (long prompts prefilled beside the decodes), and print "
                                "the p99 TPOT ratio. Other flags go to `pdserve bench`.")
    p.add_argument("--pure-prompt-len", default="fixed:8")
    p.add_argument("--mixed-prompt-len", default="uniform:8:512")
    p.add_argument("--json", type=Path, default=None, dest="json_out")
    args, load = p.parse_known_args(argv)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    results = {}
    for label, prompt_len in (("pure", args.pure_prompt_len), ("mixed", args.mixed_prompt_len)):
        print(f"--- {label}: --prompt-len {prompt_len}", flush=True)
        results[label] = bench_run(bench_parser().parse_args([*load, "--prompt-len", prompt_len,
                                                              "--label", label]))
    pure, mixed = (results[k]["run"]["tpot_s"] for k in ("pure", "mixed"))
    if not pure or not mixed:
        print("pdserve bench fused: a run had no request with two tokens or more", file=sys.stderr)
        return 1
    ratio = mixed["p99"] / pure["p99"]
    print(f"goal split-fused p99 TPOT <= {GOAL_RATIO}x pure decode: {mixed['p99'] * 1e3:.0f} ms / "
          f"{pure['p99'] * 1e3:.0f} ms = {ratio:.2f}x (p50 {mixed['p50'] / pure['p50']:.2f}x)")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
