"""Skinny GEMM (kernels/triton_linear.py) vs cuBLAS at the Llama-3-8B decode shapes, over a config sweep.

Run on a CUDA machine from the repo root: `python -m bench.linear_gpu [--rows 1,16] [--out FILE]`.
Each timing is a CUDA graph of back-to-back products over several distinct weight copies (as a decode step
reads every weight once, nothing stays in L2), GPU ms per product = median replay / copies. Prints, per
shape and row count: cuBLAS, the best Triton config, both as GB/s of weight read and as % of the
device-to-device copy bandwidth measured in the same run; writes every config's time to --out (JSON).
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from bench._cuda import cuda_missing

BF16 = torch.bfloat16
# name → (N, K): the projections of one Llama-3-8B layer (fused qkv and gate_up) and the LM head.
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}


def graph_ms(fn: Callable[[int], object], copies: int, repeats: int = 15) -> float:
    """GPU ms per fn(i) call, i over the weight copies, captured in one graph and replayed `repeats` times."""
    for i in range(copies):  # warm-up: compiles, lets cuBLAS pick, outside the capture
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            fn(i)
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times) / copies


def copy_gbps(num_bytes: int = 2 << 30) -> float:
    src = torch.empty(num_bytes // 4, dtype=BF16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = graph_ms(lambda _: dst.copy_(src), copies=1, repeats=20)
    return num_bytes / (ms * 1e-3) / 1e9


def candidate_configs(rows: int):
    from kernels.triton_linear import SkinnyConfig

    if rows == 1:
        for bn, bk, warps in itertools.product((2, 4, 8), (1024, 2048, 4096), (4, 8)):
            if bn * bk <= 16384:
                yield SkinnyConfig(bn, bk, warps, 1)  # stages: no effect without tl.dot (measured)
    else:
        for bn, bk, stages in itertools.product((32, 64, 128), (128, 256), (3, 4, 5, 6)):
            yield SkinnyConfig(bn, bk, 4, stages)  # split-K never won in a first, wider sweep


def sweep_shape(name: str, rows_list: list[int], bandwidth: float, deadline: float) -> dict:
    """Every candidate config (and cuBLAS) for one weight shape at each row count; prints the best."""
    import triton

    from kernels.triton_linear import skinny_linear, supports

    n, k = SHAPES[name]
    weight_bytes = n * k * 2
    copies = max(2, -(-(512 << 20) // weight_bytes))  # >= 512 MB per graph: L2 (50 MB) holds none of it
    weights = [torch.empty(n, k, dtype=BF16, device="cuda").normal_(std=0.02) for _ in range(copies)]

    def gbps(ms: float) -> float:
        return weight_bytes / (ms * 1e-3) / 1e9

    entries = {}
    for rows in rows_list:
        x = torch.randn(rows, k, dtype=BF16, device="cuda")
        ref = F.linear(x, weights[0]).float()
        entry = entries[f"{name}_m{rows}"] = {"n": n, "k": k, "rows": rows}
        entry["cublas_ms"] = graph_ms(lambda i, x=x: F.linear(x, weights[i]), copies)
        timings = []
        for config in candidate_configs(rows):
            if time.monotonic() > deadline or not supports(x, weights[0], config):
                continue
            try:
                got = skinny_linear(x, weights[0], config)
            except triton.runtime.errors.OutOfResources:  # too many pipeline stages for shared memory
                continue
            if not torch.allclose(got.float(), ref, atol=2e-2, rtol=2e-2):
                timings.append((float("inf"), config, "WRONG"))
                continue
            ms = graph_ms(lambda i, x=x, c=config: skinny_linear(x, weights[i], c), copies)
            timings.append((ms, config, "ok"))
        timings.sort(key=lambda t: t[0])
        entry["configs"] = [{"ms": ms, "config": vars(c), "status": s} for ms, c, s in timings]
        best_ms, best_config = (timings[0][0], timings[0][1]) if timings else (float("nan"), None)
        cublas = entry["cublas_ms"]
        print(f"{name:8s} m={rows:<3d} cuBLAS {cublas * 1e3:7.1f} us {gbps(cublas):6.0f} GB/s "
              f"({gbps(cublas) / bandwidth:4.0%}) | triton {best_ms * 1e3:7.1f} us {gbps(best_ms):6.0f} GB/s "
              f"({gbps(best_ms) / bandwidth:4.0%}) {best_config}", flush=True)
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,16")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--budget-s", type=float, default=300.0, help="stop sweeping after this long")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    if cuda_missing(__file__):
        return 2
    deadline = time.monotonic() + args.budget_s
    bandwidth = copy_gbps()
    print(f"# {torch.cuda.get_device_name()}: copy {bandwidth:.0f} GB/s", flush=True)
    results: dict = {"copy_gbps": bandwidth, "shapes": {}}
    rows_list = [int(r) for r in args.rows.split(",")]
    for name in args.shapes.split(","):
        results["shapes"].update(sweep_shape(name, rows_list, bandwidth, deadline))
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
