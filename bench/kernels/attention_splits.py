"""Decode attention at ctx 8k over int8 and int4 KV caches under the launch's candidates around its choice,
against the bf16 cache at its launch, one run (Llama-3-8B heads): the sweep behind `config.int8_launch`'s
and `config.quad_launch`'s rules (docs/benchmarks.md, "int8 / quad launches by the last wave's fill").

`python -m bench.kernels.attention_splits OUT.json [BATCHES]` (default 8,16,32,64): for each batch, the int8
cache under both of the split-K kernel's launch tiles (config.INT8_DECODE_TILES[:2]) and under each
config.INT8_PAIR_LAUNCHES entry of the pairs kernel, and the int4 quad kernel under each
config.INT4_QUAD_LAUNCHES entry (tiles and register cap), each at its launch's split count, one less, one
more and twice it; `*` marks the launch's own choice for the kernel config.INT8_DECODE_MODES[0] names.
"""
from __future__ import annotations

import functools
import sys

import torch

from bench._cuda import graph_ms
from bench.kernels.attention_launch import CONTEXT, launch_us, run_batches
from bench.kernels.quant_gpu_attention import HEAD_DIM, KV_HEADS
from kernels.attention.config import (
    INT4_QUAD_LAUNCHES,
    INT4_QUADS,
    INT8_CAST,
    INT8_DECODE_MODES,
    INT8_DECODE_TILES,
    INT8_PAIR_LAUNCHES,
    INT8_PAIRS,
    int8_launch,
    pairs_launch,
    quad_launch,
)
from kernels.attention.kernel import paged_decode_attention


def candidates(batch: int, dev: torch.device):
    """(label, cache dtype, splits, launch kwargs, whether the launch picks it) around the launch's choice."""
    pairs = batch * KV_HEADS
    splits8, tiles8 = int8_launch(pairs, CONTEXT, dev)
    splits_p, tiles_p = pairs_launch(pairs, CONTEXT, dev)
    splits4, tiles4, cap4 = quad_launch(pairs, CONTEXT, dev)
    for tiles in INT8_DECODE_TILES[:2]:
        for splits in sorted({max(1, splits8 - 1), splits8, splits8 + 1, 2 * splits8}):
            yield (f"int8 tiles={tiles}", "int8", splits, {"tiles": tiles, "int8_mode": INT8_CAST},
                   INT8_DECODE_MODES[0] == INT8_CAST and (splits, tiles) == (splits8, tiles8))
    for tiles, _, _ in INT8_PAIR_LAUNCHES:
        for splits in sorted({max(1, splits_p - 1), splits_p, splits_p + 1, 2 * splits_p}):
            yield (f"int8 pairs tiles={tiles}", "int8", splits, {"tiles": tiles, "int8_mode": INT8_PAIRS},
                   INT8_DECODE_MODES[0] == INT8_PAIRS and (splits, tiles[:2]) == (splits_p, tiles_p[:2]))
    for tiles, _, cap in INT4_QUAD_LAUNCHES:
        for splits in sorted({max(1, splits4 - 1), splits4, splits4 + 1, 2 * splits4}):
            yield (f"int4 quads tiles={tiles} cap={cap}", "int4", splits,
                   {"tiles": tiles, "int4_dequant": INT4_QUADS, "max_registers": cap},
                   (splits, tiles[:2], cap) == (splits4, tiles4[:2], cap4))


def _decode(q: torch.Tensor, kv, meta, splits: int, kwargs: dict, _copy: int) -> torch.Tensor:
    return paged_decode_attention(q, *kv, meta, HEAD_DIM ** -0.5, splits, **kwargs)


def splits_row(batch: int, q: torch.Tensor, meta, caches: dict) -> dict:
    base = launch_us(q, caches["bfloat16"], meta)
    print(f"B={batch} ctx={CONTEXT} bf16 cache at its launch: {base:.1f} us", flush=True)
    row = {"bfloat16": base}
    for label, dtype, splits, kwargs, chosen in candidates(batch, q.device):
        us = 1e3 * graph_ms(functools.partial(_decode, q, caches[dtype], meta, splits, kwargs), 1)
        name = f"{label} splits={splits}"
        print(f"B={batch} {name} programs={batch * KV_HEADS * splits}: {us:.1f} us "
              f"{base / us:.2f}x bf16{' *' if chosen else ''}", flush=True)
        row[name] = us
    return row


def main(out_path: str, batches: str = "8,16,32,64") -> int:
    return run_batches(out_path, batches, splits_row, __file__)


if __name__ == "__main__":
    sys.exit(main(*(sys.argv[1:] or ["bench/results/attention_splits.json"])))
