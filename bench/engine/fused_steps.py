"""Median ms of a decode-only step vs the same decode batch with a prefill chunk beside it (split-fused).

`python -m bench.engine.fused_steps [--decodes 1,2,4] [--prefill 0,1,4,16,64] [--steps 10]
[--fused-path flat,eager] [--kv-cache auto|int8|int4]`: the default engine (the embedded model, CPU, one
torch thread as a Ray worker has; its KV cache of `--kv-cache`), `decodes` sequences of 32-token prompts
decoding, plus one long prompt prefilled `prefill` tokens a step (max_batch_tokens = decodes + prefill, no
fair-prefill threshold, no split-fused credit), so each timed step is exactly that mix. What it shows: the
fixed cost of leaving the decode-only path (`engine/step_cost.py` pays it once a window). `--fused-path
eager` runs split-fused steps through the eager forward, as before they ran flat
(engine/executors/cpu_fused.py); with both, one engine's steps take the two paths in turn.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import torch

from bench.serving.batching import prompt_ids
from contracts.sampling import SamplingParams
from engine.config import KV_CACHE_DTYPES, EngineConfig
from engine.executors.cpu_flat import CpuFlatExecutor
from engine.llm_engine import LLMEngine


def step_ms(decodes: int, prefill: int, steps: int, paths: Sequence[str] = ("flat",),
            kv_cache: str = "auto") -> dict[str, float]:
    """Median ms of a step per fused path; with several paths the steps take them in turn (one engine, one
    state), so a busy moment of a shared box hits every path alike."""
    engine = LLMEngine(EngineConfig(max_batch_tokens=decodes + prefill, long_prefill_token_threshold=0,
                                    fused_step_max_slowdown=0, kv_cache_dtype=kv_cache))
    flat = isinstance(engine.executor, CpuFlatExecutor)
    if not flat:
        print(f"(the engine runs {type(engine.executor).__name__}: no flat path for its model and cache)")
    fused = engine.executor.fused if flat else None  # the flat split-fused path; None runs it eager
    sampling = SamplingParams(max_tokens=1000, ignore_eos=True)
    for i in range(decodes):
        engine.add_request(f"d{i}", prompt_ids(i, 32), sampling)
    while True:  # until every prompt is in and each step decodes one token per sequence (a 1-token
        # prefill chunk mid-prompt samples nothing: it is not a decode)
        batch = engine.schedule()
        engine.postprocess(batch, engine.execute(batch))
        if len(batch.chunks) == decodes and all(c.num_new_tokens == c.num_sampled == 1 for c in batch.chunks):
            break
    if prefill:  # long enough to be mid-prefill in every step (one untimed step per path first: packing)
        engine.add_request("prompt", prompt_ids(99, prefill * (steps + 1) * len(paths) + 64), sampling)
    times: dict[str, list[float]] = {path: [] for path in paths}
    for step in range((steps + 1) * len(paths)):
        path = paths[step % len(paths)]
        if flat:
            engine.executor.fused = fused if path == "flat" else None
        t0 = time.perf_counter()
        batch = engine.schedule()
        engine.postprocess(batch, engine.execute(batch))
        if step >= len(paths):
            times[path].append(time.perf_counter() - t0)
    return {path: statistics.median(t) * 1e3 for path, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--decodes", default="1,2,4")
    p.add_argument("--prefill", default="0,1,4,16,64")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--fused-path", default="flat", help="comma-separated: flat, eager")
    p.add_argument("--kv-cache", default="auto", choices=KV_CACHE_DTYPES, help="the engine's KV cache dtype")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    paths = tuple(args.fused_path.split(","))
    for d in map(int, args.decodes.split(",")):
        pure: dict[str, float] = {}
        for n in map(int, args.prefill.split(",")):
            for path, ms in step_ms(d, n, args.steps, paths, args.kv_cache).items():
                if n == 0:
                    pure[path] = ms
                ratio = f"  {ms / pure[path]:.2f}x the decode-only step" if path in pure and n else ""
                print(f"{path:5s} decodes {d:2d}  prefill {n:3d} tokens: {ms:6.1f} ms{ratio}", flush=True)

if __name__ == "__main__":
    main()
