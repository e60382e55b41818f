"""Seconds from `LLMEngine(config)` to a ready engine on CPU, per weight scheme and KV cache dtype: model
load, the weight transform, an int4 cache's key calibration, the CPU linears' packing and the cache
allocation — what a worker (re)start pays before it serves.

    .venv/bin/python -m bench.engine.engine_start [--weights auto w4a16 ...] [--kv-cache float32 int4 ...]
        [--threads 1] [--runs 3] [--json OUT]

Every (weights, kv-cache) pair runs `--runs` times in rounds (one of each pair a round, so load on a shared
box spreads over all of them); prints each pair's times, median and best.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from engine.config import KV_CACHE_DTYPES, WEIGHT_SCHEMES, EngineConfig
from engine.llm_engine import LLMEngine


def start_seconds(weights: str, kv_cache: str, threads: int) -> float:
    """One engine built and dropped; the wall time of the build."""
    config = EngineConfig(weights=weights, kv_cache_dtype=kv_cache, num_kv_blocks=64, num_threads=threads)
    start = time.perf_counter()
    engine = LLMEngine(config)
    seconds = time.perf_counter() - start
    del engine
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", nargs="+", default=["auto"],
                        choices=[w for w in WEIGHT_SCHEMES if w != "bf16"])  # bf16 is a CUDA compute dtype
    parser.add_argument("--kv-cache", nargs="+", default=["float32", "int4"], choices=KV_CACHE_DTYPES)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the engine (default 1)")
    parser.add_argument("--runs", type=int, default=3, help="builds of each pair (default 3)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")
    torch.set_num_threads(args.threads)
    pairs = [(w, kv) for w in args.weights for kv in args.kv_cache]
    times: dict[tuple[str, str], list[float]] = {pair: [] for pair in pairs}
    for _ in range(args.runs):
        for pair in pairs:
            times[pair].append(start_seconds(*pair, args.threads))
    rows = []
    for (weights, kv_cache), seconds in times.items():
        row = {"weights": weights, "kv_cache": kv_cache, "seconds": seconds,
               "median": statistics.median(seconds), "best": min(seconds)}
        rows.append(row)
        print(f"weights {weights:6s} kv-cache {kv_cache:8s} start {row['median']:6.2f} s median, "
              f"{row['best']:6.2f} best  ({' '.join(f'{s:.2f}' for s in seconds)})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
