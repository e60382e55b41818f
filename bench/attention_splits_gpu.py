"""Decode attention vs its split-K count at Llama-3-8B shapes: µs per layer, KV GB/s, and the auto pick.

Run on a CUDA machine from the repo root: `python -m bench.attention_splits_gpu`. One CUDA graph runs the
decode kernel over 32 layers' separate caches (as a decode step does: no layer's KV is still in L2), for each
batch × context point and each split count; prints µs per layer and the count `choose_num_splits` picks for
a graph captured at max_seq_len = --max-model-len.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

from bench.kernels_gpu import BLOCK, DTYPE, HEAD_DIM, HEADS, KV_HEADS, paged_batch

LAYERS = 32


def graph_us_per_call(calls: list, repeats: int = 10) -> float:
    for call in calls:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times) * 1e3 / len(calls)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", default="1x512,1x4096,16x512,16x4096,64x512")
    parser.add_argument("--splits", default="1,2,4,8,16,32")
    parser.add_argument("--max-model-len", type=int, default=8192)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/attention_splits_gpu.py needs a CUDA device", file=sys.stderr)
        return 2
    from kernels.triton_attention import choose_num_splits, paged_decode_attention

    scale = HEAD_DIM ** -0.5
    for point in args.points.split(","):
        batch, context = map(int, point.split("x"))
        q, k_cache, v_cache, meta = paged_batch([(context - 1, 1)] * batch)
        caches = [(k_cache, v_cache)] + [(torch.randn_like(k_cache), torch.randn_like(v_cache))
                                         for _ in range(LAYERS - 1)]
        kv_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * 2
        auto = choose_num_splits(batch, KV_HEADS, args.max_model_len, q.device)
        cells = []
        for splits in map(int, args.splits.split(",")):
            calls = [lambda q=q, k=k, v=v, m=meta, s=splits: paged_decode_attention(q, k, v, m, scale,
                                                                                    num_splits=s)
                     for k, v in caches]
            us = graph_us_per_call(calls)
            cells.append(f"s={splits}: {us:6.1f} us {kv_bytes / us / 1e3:5.0f} GB/s")
        print(f"B={batch:<3d} ctx={context:<5d} auto s={auto:<3d} | " + " | ".join(cells), flush=True)
        del caches, k_cache, v_cache
        torch.cuda.empty_cache()
    print(f"(heads {HEADS}/{KV_HEADS}, head_dim {HEAD_DIM}, block {BLOCK}, {DTYPE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
