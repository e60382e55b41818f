"""Decode attention at ctx 8k over bf16 / int8 / int4 KV caches, each at its launch's defaults (Llama-3-8B
heads, B = 1, 8, 16, 32, 64 unless BATCHES says), with nothing else: the before / after of a kernel change
in one device call.

`python -m bench.kernels.attention_launch OUT.json [BATCHES]` times the tree on PYTHONPATH; to time an
older tree with this script, run the file by path from that tree: `(cd OLD && PYTHONPATH=$PWD python
NEW/bench/kernels/attention_launch.py OUT.json)` (it imports only modules older trees have).
bench/kernels/quant_gpu's attention section prints the same rows and then the launch sweeps.
"""
from __future__ import annotations

import json
import sys

import torch

from bench._cuda import cuda_missing, graph_ms
from bench.kernels.quant_gpu_attention import BLOCK, HEAD_DIM, HEADS, KV_HEADS, decode_batch
from contracts.kv_cache_spec import KVCacheSpec, scales_for
from engine.kv_cache import KVCache
from kernels.attention.kernel import paged_attention_triton
from kernels.store_kv.kernel import store_kv_triton

CONTEXT = 8192


def batch_caches(batch: int, dev: torch.device):
    """(q, meta, {cache dtype: (k_cache, v_cache)}): `batch` sequences of CONTEXT tokens, one bf16 query
    row each, the same random K/V stored into a bf16, an int8 and an int4 cache."""
    meta, num_blocks = decode_batch(batch, CONTEXT, dev)
    gen = torch.Generator(device=dev).manual_seed(batch)
    k, v = (torch.randn(num_blocks * BLOCK, KV_HEADS, HEAD_DIM, generator=gen, device=dev,
                        dtype=torch.bfloat16) for _ in "kv")
    q = torch.randn(batch, HEADS, HEAD_DIM, generator=gen, device=dev, dtype=torch.bfloat16)
    caches = {}
    for dtype in ("bfloat16", "int8", "int4"):
        cache = KVCache(KVCacheSpec(BLOCK, KV_HEADS, HEAD_DIM, dtype, scales_for(dtype, HEAD_DIM)), 1,
                        num_blocks, dev)
        store_kv_triton(k, v, *cache.layer(0), torch.arange(num_blocks * BLOCK, device=dev))
        caches[dtype] = cache.layer(0)
    return q, meta, caches


def launch_us(q: torch.Tensor, kv, meta) -> float:
    """µs of paged_attention_triton at the launch's defaults over one cache's (k, v)."""
    return 1e3 * graph_ms(lambda i: paged_attention_triton(q, *kv, meta, HEAD_DIM ** -0.5), 1)


def run_batches(out_path: str, batches: str, measure, script: str = __file__) -> int:
    """For each batch size in `batches`, measure(batch, q, meta, caches) → {name: µs} (it prints its rows);
    the rows to out_path as JSON. `script`: the file a missing GPU is reported for."""
    if cuda_missing(script):
        return 2
    dev = torch.device("cuda")
    results: dict = {"device": torch.cuda.get_device_name(), "context": CONTEXT, "us": {}}
    for batch in map(int, batches.split(",")):
        q, meta, caches = batch_caches(batch, dev)
        results["us"][batch] = measure(batch, q, meta, caches)
        del caches
        torch.cuda.empty_cache()
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)
    return 0


def launch_row(batch: int, q: torch.Tensor, meta, caches: dict) -> dict:
    row = {dtype: launch_us(q, kv, meta) for dtype, kv in caches.items()}
    print(f"B={batch} ctx={CONTEXT} us: " + ", ".join(f"{d} {t:.1f}" for d, t in row.items())
          + f" | int8 {row['bfloat16'] / row['int8']:.2f}x int4 {row['bfloat16'] / row['int4']:.2f}x",
          flush=True)
    return row


def main(out_path: str, batches: str = "1,8,16,32,64") -> int:
    return run_batches(out_path, batches, launch_row)


if __name__ == "__main__":
    sys.exit(main(*(sys.argv[1:] or ["bench/results/attention_launch.json"])))
