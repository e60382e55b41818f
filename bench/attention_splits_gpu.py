"""Decode attention vs its split-K count at Llama-3-8B shapes: µs per layer, KV GB/s, and the auto pick.

Run on a CUDA machine from the repo root: `python -m bench.attention_splits_gpu`. One CUDA graph runs the
decode kernel over 32 layers' separate caches (as a decode step does: no layer's KV is still in L2), for each
batch × context point and each split count; prints µs per layer and the count `choose_num_splits` picks for
a graph captured at max_seq_len = --max-model-len.
"""
from __future__ import annotations

import argparse
import sys

import torch

from bench._cuda import cuda_missing
from bench.kernels_gpu import BLOCK, DTYPE, HEAD_DIM, HEADS, KV_HEADS, paged_batch
from bench.linear_gpu import graph_ms

LAYERS = 32


def time_point(batch: int, context: int, splits_list: list[int], max_model_len: int) -> str:
    """One table row: µs per layer and KV GB/s for each split count at this batch × context."""
    from kernels.triton_attention import choose_num_splits, paged_decode_attention

    q, k_cache, v_cache, meta = paged_batch([(context - 1, 1)] * batch)
    caches = [(k_cache, v_cache)] + [(torch.randn_like(k_cache), torch.randn_like(v_cache))
                                     for _ in range(LAYERS - 1)]
    kv_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * 2
    scale = HEAD_DIM ** -0.5
    cells = []
    for splits in splits_list:
        def call(i: int, s: int = splits) -> torch.Tensor:
            return paged_decode_attention(q, caches[i][0], caches[i][1], meta, scale, num_splits=s)

        us = graph_ms(call, copies=len(caches)) * 1e3
        cells.append(f"s={splits}: {us:6.1f} us {kv_bytes / us / 1e3:5.0f} GB/s")
    auto = choose_num_splits(batch, KV_HEADS, max_model_len, q.device)
    return f"B={batch:<3d} ctx={context:<5d} auto s={auto:<3d} | " + " | ".join(cells)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", default="1x512,1x4096,16x512,16x4096,64x512")
    parser.add_argument("--splits", default="1,2,4,8,16,32")
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--configs", default="",
                        help="decode tiles to compare: BLOCK_NxWARPSxSTAGES,... (default: the tuned one)")
    args = parser.parse_args(argv)
    if cuda_missing(__file__):
        return 2
    splits_list = [int(s) for s in args.splits.split(",")]
    import kernels.triton_attention as attention

    tuned = attention.decode_config
    for config in args.configs.split(",") if args.configs else [""]:
        if config:
            block_n, warps, stages = map(int, config.split("x"))
            attention.decode_config = lambda head_dim, interpreted, c=(block_n, warps, stages): c
            print(f"decode tiles BLOCK_N={block_n} warps={warps} stages={stages}")
        for point in args.points.split(","):
            batch, context = map(int, point.split("x"))
            print(time_point(batch, context, splits_list, args.max_model_len), flush=True)
            torch.cuda.empty_cache()
    attention.decode_config = tuned
    print(f"(heads {HEADS}/{KV_HEADS}, head_dim {HEAD_DIM}, block {BLOCK}, {DTYPE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
