"""Decode attention at one batch and context over bf16, int8 and int4 KV caches (kernels/attention as is)."""
from __future__ import annotations

import random

import torch

from bench.kernels.quant_common import Run, rel_err, row
from contracts.kv_cache_spec import KVCacheSpec, scales_for
from engine.kv_cache import KVCache, dtype_name
from kernels.attention.metadata import AttentionMetadata, SeqSpan

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16  # Llama-3-8B
REFERENCE_MAX_TOKENS = 64 * 1024  # the torch reference checks batches up to this many cached tokens


def decode_batch(batch: int, context: int, device: torch.device) -> tuple[AttentionMetadata, int]:
    """batch sequences of `context` tokens (the last one this step's query) over shuffled blocks."""
    per_seq = -(-context // BLOCK)
    pool = list(range(batch * per_seq))
    random.Random(0).shuffle(pool)
    spans, slots = [], []
    for seq in range(batch):
        blocks = tuple(pool[seq * per_seq:(seq + 1) * per_seq])
        spans.append(SeqSpan(seq, 1, context, blocks, None))
        slots.append(blocks[(context - 1) // BLOCK] * BLOCK + (context - 1) % BLOCK)
    return AttentionMetadata.from_spans(spans, slots, BLOCK, device=device), len(pool)


def attention_case(run: Run, batch: int, context: int) -> dict:
    """The same random K / V stored into each cache dtype, the decode kernel timed over each."""
    from kernels.attention.kernel import paged_attention_triton
    from kernels.attention.reference import paged_attention_ref
    from kernels.store_kv.kernel import store_kv_triton

    dev = run.device
    meta, num_blocks = decode_batch(batch, context, dev)
    gen = torch.Generator(device=dev).manual_seed(batch)
    k, v = (torch.randn(num_blocks * BLOCK, KV_HEADS, HEAD_DIM, generator=gen, device=dev, dtype=run.dtype)
            for _ in "kv")
    q = torch.randn(batch, HEADS, HEAD_DIM, generator=gen, device=dev, dtype=run.dtype)
    scale = HEAD_DIM ** -0.5
    shape = f"B={batch} ctx={context}"
    out: dict = {}
    base = None
    for dtype in (dtype_name(run.dtype), "int8", "int4"):
        spec = KVCacheSpec(BLOCK, KV_HEADS, HEAD_DIM, dtype, scales_for(dtype, HEAD_DIM))
        cache = KVCache(spec, 1, num_blocks, dev)
        store_kv_triton(k, v, *cache.layer(0), torch.arange(num_blocks * BLOCK, device=dev))
        k_cache, v_cache = cache.layer(0)
        ms = run.timer(lambda i, kc=k_cache, vc=v_cache: paged_attention_triton(q, kc, vc, meta, scale), 1)
        base = base or ms
        err = None
        if batch * context <= REFERENCE_MAX_TOKENS:  # the reference reads the quantized cache as stored
            err = rel_err(paged_attention_triton(q, k_cache, v_cache, meta, scale),
                          paged_attention_ref(q, k_cache, v_cache, meta, scale))
        note = " (fits L2)" if cache.num_bytes < 50 << 20 else ""
        roof = run.roof_ms(cache.num_bytes)
        out[dtype] = row("attention", shape, f"decode KV {dtype}{note}", ms, base, roof, err)
    return out
