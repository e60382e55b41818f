"""Where a graphed decode step's time goes: GPU kernels by total time, GPU idle between steps, host phases.

Run on a CUDA machine from the repo root:
`python -m bench.engine.decode_gpu_profile [--batch 1] [--context 512] [--weights w4a16] [--kv-cache int4]`.
Llama-3-8B shape with random bf16 weights (as bench/engine/decode_gpu.py), quantized by the engine's own
transform when `--weights` names a scheme. Prints (1) the kernels of `--steps` profiled engine steps grouped
by name: calls per step, µs per step each kernel adds to the stream (from the later of its start and the
previous kernel's end to its own end: under PDL a kernel starts while the one before drains, and its own
duration counts that wait), and µs per step as the profiler reports them; (2) per step: wall ms, GPU-busy ms
(the union of kernel intervals) and the idle rest; (3) host ms per phase of LLMEngine.step (schedule, run =
forward + sample + the host sync, postprocess), each synchronized so a phase's GPU wait lands where it is.
"""
from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time

import torch

from bench._cuda import cuda_missing
from bench.engine.decode_gpu import BF16, LLAMA3_8B, start_decoding
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.random_models import build_random_model


def busy_ms(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (µs in, ms out)."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total / 1e3


def added_us(intervals: list[tuple[float, float]]) -> list[float]:
    """Per [start, end) interval, in start order: the time it adds past every interval before it (end minus
    the later of its start and the latest end so far; 0 if inside). They sum to the union's length."""
    out, last_end = [], float("-inf")
    for start, end in intervals:
        out.append(max(0.0, end - max(start, last_end)))
        last_end = max(last_end, end)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--weights", default="bf16", choices=("bf16", "w8", "w4a16", "w8a8"),
                        help="weight scheme (EngineConfig.weights)")
    parser.add_argument("--kv-cache", default="auto", choices=("auto", "int8", "int4"),
                        help="KV cache dtype (EngineConfig.kv_cache_dtype)")
    args = parser.parse_args(argv)
    if cuda_missing(__file__):
        return 2
    model = build_random_model(LLAMA3_8B, BF16, "cuda", seed=0, std=0.02)
    blocks = args.batch * (-(-(args.context + 8 * args.steps + 64) // 16))
    engine = LLMEngine(EngineConfig(model_path="random:llama-3-8b", device="cuda", dtype="bfloat16",
                                    num_kv_blocks=blocks,
                                    weights=args.weights, kv_cache_dtype=args.kv_cache,
                                    max_model_len=args.context + 8 * args.steps + 64,
                                    max_num_seqs=args.batch), model=(model.config, model))
    start_decoding(engine, args.batch, args.context, "profile")
    for _ in range(5):
        engine.step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        wall_ms = (time.perf_counter() - t0) * 1e3 / args.steps
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    added = added_us([(e.time_range.start, e.time_range.end) for e in kernels])
    by_name: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    for e, own in zip(kernels, added, strict=True):
        by_name[e.name].append((own, e.device_time))
    print(f"# batch {args.batch}, context {args.context}, weights {args.weights}, kv {args.kv_cache}: "
          f"{args.steps} profiled steps")
    print(f"{'added us/step':>13} {'kernel us/step':>14} {'calls/step':>10}  kernel")
    rows = sorted(by_name.items(), key=lambda kv: -sum(own for own, _ in kv[1]))
    for name, times in rows[:args.top]:
        own, dur = (sum(t[i] for t in times) / args.steps for i in (0, 1))
        print(f"{own:13.1f} {dur:14.1f} {len(times) / args.steps:10.1f}  {name[:100]}")
    busy = busy_ms([(e.time_range.start, e.time_range.end) for e in kernels]) / args.steps
    print(f"kernels per step {len(kernels) / args.steps:.0f}; wall {wall_ms:.3f} ms/step (profiled), "
          f"GPU busy {busy:.3f} ms, idle {wall_ms - busy:.3f} ms")

    phases: dict[str, list[float]] = collections.defaultdict(list)
    for _ in range(30):
        t0 = time.perf_counter()
        out = engine.schedule()
        t1 = time.perf_counter()
        run = engine.execute(out)  # ends in the host sync on the sampled ids
        t2 = time.perf_counter()
        engine.postprocess(out, run)
        t3 = time.perf_counter()
        for key, ms in (("schedule", t1 - t0), ("run", t2 - t1), ("postprocess", t3 - t2)):
            phases[key].append(ms * 1e3)
    graphs = getattr(engine.executor, "graphs", None)
    out = engine.schedule()
    if graphs is not None and engine.executor.graphed(out):
        # CPU cost of launching a graphed step (fill the inputs, H2D copy, graph launch): the GPU idles for it
        # unless something else keeps it busy; the same step replayed (it rewrites the same KV slots).
        with torch.inference_mode():
            for _ in range(30):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                graphs.run(out.chunks)
                phases["graph launch"].append((time.perf_counter() - t0) * 1e3)
    engine.postprocess(out, engine.execute(out))
    medians = ", ".join(f"{k} {statistics.median(v):.3f}" for k, v in phases.items())
    print(f"host phases (median ms): {medians}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
