"""Median ms of a decode-only step vs the same decode batch with a prefill chunk beside it (split-fused).

`python -m bench.engine.fused_steps [--decodes 1,2,4] [--prefill 0,1,4,16,64] [--steps 10]
[--fused-path flat,eager]`: the default
engine (the embedded model, CPU, one torch thread as a Ray worker has), `decodes` sequences of 32-token
prompts decoding, plus one long prompt prefilled `prefill` tokens a step (max_batch_tokens = decodes +
prefill, no fair-prefill threshold, no split-fused credit), so each timed step is exactly that mix. What it
shows: the fixed cost of leaving the decode-only path (`engine/step_cost.py` pays it once a window).
`--fused-path eager` runs split-fused steps through the eager forward, as before they ran flat
(engine/executors/cpu_fused.py); with both, each mix is timed on both paths back to back.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.serving.batching import prompt_ids
from contracts.sampling import SamplingParams
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine


def step_ms(decodes: int, prefill: int, steps: int, fused_path: str = "flat") -> float:
    engine = LLMEngine(EngineConfig(max_batch_tokens=decodes + prefill, long_prefill_token_threshold=0,
                                    fused_step_max_slowdown=0))
    if fused_path == "eager":
        engine.executor.fused = None
    sampling = SamplingParams(max_tokens=1000, ignore_eos=True)
    for i in range(decodes):
        engine.add_request(f"d{i}", prompt_ids(i, 32), sampling)
    while True:  # until every prompt is in and each step decodes one token per sequence (a 1-token
        # prefill chunk mid-prompt samples nothing: it is not a decode)
        batch = engine.schedule()
        engine.postprocess(batch, engine.execute(batch))
        if len(batch.chunks) == decodes and all(c.num_new_tokens == c.num_sampled == 1 for c in batch.chunks):
            break
    if prefill:  # long enough to be mid-prefill in every timed step
        engine.add_request("prompt", prompt_ids(99, prefill * steps + 64), sampling)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = engine.schedule()
        engine.postprocess(batch, engine.execute(batch))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--decodes", default="1,2,4")
    p.add_argument("--prefill", default="0,1,4,16,64")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--fused-path", default="flat", help="comma-separated: flat, eager")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    paths = args.fused_path.split(",")
    for d in map(int, args.decodes.split(",")):
        pure: dict[str, float] = {}
        for n in map(int, args.prefill.split(",")):
            for path in paths:  # back to back, so a busy moment of a shared box hits both paths alike
                ms = step_ms(d, n, args.steps, path)
                if n == 0:
                    pure[path] = ms
                ratio = f"  {ms / pure[path]:.2f}x the decode-only step" if path in pure and n else ""
                print(f"{path:5s} decodes {d:2d}  prefill {n:3d} tokens: {ms:6.1f} ms{ratio}", flush=True)


if __name__ == "__main__":
    main()
