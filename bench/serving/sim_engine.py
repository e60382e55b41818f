"""Times the engine alone for the simulator's CPU step costs: prefill ms vs prompt tokens, decode ms vs batch.

`python -m bench.serving.sim_engine [--prefill 16,32,64,128,256,512] [--decode 1,2,4,8,16,32] [--steps 8]
--json bench/results/sim_engine_cpu.json`: the default engine as a CPU worker runs it (the embedded model,
one torch thread, EngineConfig defaults but no prefix cache, no split-fused credit and the whole prompt in
one step), so a step's cost is known by itself, not inferred from requests' TTFT and TPOT in the cluster.
`sim fit cpu --engine` reads the JSON: prefill's per-token and per-pair parts and the decode step's slope per
stream come from the medians, the simulator's step spread (sim_spread.py) from every timed step.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from bench.serving.batching import prompt_ids
from contracts.sampling import SamplingParams
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine

DECODE_PROMPT = 64  # the sweep's prompt length: decode steps at the context the runs decode at


def _step(engine: LLMEngine) -> float:
    t0 = time.perf_counter()
    batch = engine.schedule()
    engine.postprocess(batch, engine.execute(batch))
    return (time.perf_counter() - t0) * 1e3


def prefill_ms(engine: LLMEngine, tokens: int, reps: int, tag: int) -> list[float]:
    """Each timed step's ms, in order, that prefills a whole `tokens`-token prompt (nothing else in the
    engine)."""
    times = []
    for k in range(reps + 1):  # the first is untimed: buffers sized for this length
        engine.add_request(f"p{tag}-{k}", prompt_ids(tag * 100 + k, tokens),
                           SamplingParams(max_tokens=1, ignore_eos=True))
        ms = _step(engine)
        while engine.has_work():
            _step(engine)
        if k:
            times.append(ms)
    return times


def cached_prefill_ms(cached: int, tokens: int, reps: int) -> list[float]:
    """Each timed step's ms, in order, of a step that prefills `tokens` new tokens after a `cached`-token
    prefix the prefix cache holds (a shared system prompt's hit), on an engine with the cache on."""
    engine = LLMEngine(EngineConfig(max_batch_tokens=cached + tokens, long_prefill_token_threshold=0,
                                    fused_step_max_slowdown=0))
    prefix = prompt_ids(7, cached)
    once = SamplingParams(max_tokens=1, ignore_eos=True)
    times = []
    for k in range(reps + 2):  # the first computes the prefix; the second is untimed (buffers)
        engine.add_request(f"c{k}", prefix + prompt_ids(500 + k, tokens), once)
        ms = _step(engine)
        while engine.has_work():
            _step(engine)
        if k >= 2:
            times.append(ms)
    return times


def decode_ms(engine: LLMEngine, batch: int, steps: int) -> list[float]:
    """Each timed ms, in order, of a decode-only step of `batch` sequences with DECODE_PROMPT-token
    prompts."""
    # Long enough that no sequence ends before every prompt is in (prompts enter one budget at a time).
    sampling = SamplingParams(max_tokens=steps + batch * DECODE_PROMPT, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"d{batch}-{i}", prompt_ids(1000 + i, DECODE_PROMPT), sampling)
    while engine.has_work():  # until every prompt is in: each step then samples one token per sequence
        b = engine.schedule()
        engine.postprocess(b, engine.execute(b))
        if len(b.chunks) == batch and all(c.num_new_tokens == c.num_sampled == 1 for c in b.chunks):
            break
    times = [_step(engine) for _ in range(steps)]
    for i in range(batch):  # not run to their end: that would be batch x DECODE_PROMPT more steps
        engine.abort(f"d{batch}-{i}")
    return times


def _round(times: list[float]) -> list[float]:
    return [round(t, 2) for t in times]


def _line(times: list[float]) -> str:
    q = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
    return (f"median {statistics.median(times):7.1f} ms, p10 {q[0]:7.1f}, p90 {q[-1]:7.1f} "
            f"({len(times)} steps)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prefill", default="16,32,64,128,256,512", help="prompt lengths ('' = none)")
    p.add_argument("--decode", default="1,2,4,8,16,32", help="decode batches ('' = none)")
    p.add_argument("--cached", default="256:32,256:64,256:128", metavar="PREFIX:TOKENS,...",
                   help="prefills of TOKENS new tokens after a cached PREFIX (a prefix-cache hit)")
    p.add_argument("--steps", type=int, default=8, help="timed steps (prefill: prompts) per point")
    p.add_argument("--decode-steps", type=int, default=None,
                   help="timed steps per decode batch (default --steps): the spread needs a few hundred")
    p.add_argument("--json", type=Path, default=None, dest="json_out")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    lengths = [int(x) for x in args.prefill.split(",") if x]  # "" = none: time only the others
    engine = LLMEngine(EngineConfig(max_batch_tokens=max(lengths, default=512),
                                    long_prefill_token_threshold=0, fused_step_max_slowdown=0,
                                    prefix_caching=False))
    out: dict = {"load_average_start": os.getloadavg(), "prefill": [], "decode": []}
    # step_ms: the median (what the fit's regressions read); steps_ms: every timed step in order (the
    # spread the simulator samples, sim_spread.py)
    for n in lengths:
        times = prefill_ms(engine, n, args.steps, n)
        out["prefill"].append({"tokens": n, "step_ms": statistics.median(times), "steps_ms": _round(times)})
        print(f"prefill {n:4d} tokens: {_line(times)}", flush=True)
    for c, n in (map(int, x.split(":")) for x in args.cached.split(",") if x):
        times = cached_prefill_ms(c, n, args.steps)
        out["prefill"].append({"tokens": n, "cached": c, "step_ms": statistics.median(times),
                               "steps_ms": _round(times)})
        print(f"prefill {n:4d} tokens after {c} cached: {_line(times)}", flush=True)
    for b in (int(x) for x in args.decode.split(",") if x):
        times = decode_ms(engine, b, args.decode_steps or args.steps)
        out["decode"].append({"batch": b, "context": DECODE_PROMPT, "step_ms": statistics.median(times),
                              "steps_ms": _round(times)})
        print(f"decode batch {b:3d}: {_line(times)}", flush=True)
    out["load_average_end"] = os.getloadavg()
    if args.json_out:
        args.json_out.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
