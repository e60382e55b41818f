"""Decode attention at one batch and context over bf16, int8 and int4 KV caches: the launch's choices, the
int8 tile / mode sweep, the int4 modes and the int4 quad kernel's tiles, in one run."""
from __future__ import annotations

import random

import torch

from bench.kernels.quant_common import MAX_REL_ERR, Run, rel_err, row, skipped
from contracts.kv_cache_spec import KVCacheSpec, scales_for
from engine.kv_cache import KVCache, dtype_name
from kernels.attention.config import (
    INT4_DEQUANT_MODES,
    INT4_QUAD_LAUNCHES,
    INT4_QUADS,
    INT8_DECODE_MODES,
    INT8_DECODE_TILES,
    choose_num_splits,
)
from kernels.attention.metadata import AttentionMetadata, SeqSpan

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16  # Llama-3-8B
REFERENCE_MAX_TOKENS = 64 * 1024  # the torch reference checks batches up to this many cached tokens
# the int4 quad kernel's tiles and register caps the sweep tries: its launches' (the first the launch's for
# two programs an SM), and 256-key tiles (the runner-up of the last sweep: docs/benchmarks.md)
QUAD_TILE_SWEEP = tuple(tiles for tiles, _, _ in INT4_QUAD_LAUNCHES) + ((256, 4, 2),)
QUAD_CAPS = sorted({cap for _, _, cap in INT4_QUAD_LAUNCHES})


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


def attention_case(run: Run, batch: int, context: int, sweeps: tuple[str, ...] = ("int8", "int4")) -> dict:
    """The same random K / V stored into each cache dtype, the decode kernel timed over each; then the sweeps
    named (int8_sweep, int4_sweep) over those caches."""
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
        if dtype == "int8" and "int8" in sweeps:
            out["int8_sweep"] = int8_sweep(run, q, k_cache, v_cache, meta, scale, shape, base, roof)
        if dtype == "int4" and "int4" in sweeps:
            out["int4_sweep"] = int4_sweep(run, q, k_cache, v_cache, meta, scale, shape, base, roof)
    return out


def int4_sweep(run: Run, q: torch.Tensor, k_cache, v_cache, meta: AttentionMetadata, scale: float, shape: str,
               base_ms: float, roof_ms: float) -> dict:
    """The int4 cache under every config.INT4_DEQUANT_MODES mode at the launch's tiles and split count; then
    the quad kernel (mode INT4_QUADS) under QUAD_TILE_SWEEP tiles, each under every QUAD_CAPS register cap,
    at its automatic split count, and the fastest of those at half, twice and four times the splits."""
    from kernels.attention.kernel import paged_decode_attention

    ref = reference(q, k_cache, v_cache, meta, scale)
    results: dict = {}
    best = None

    def add(config: str, fn) -> dict | None:
        nonlocal best
        entry = timed(run, shape, "decode KV int4 sweep", config, base_ms, roof_ms, ref, fn)
        if entry:
            results[config] = entry
            best = entry if faster(entry, best) else best
        return entry

    for mode in INT4_DEQUANT_MODES:
        add(f"int4_dequant={mode}",
            lambda m=mode: paged_decode_attention(q, k_cache, v_cache, meta, scale, int4_dequant=m))
    auto = choose_num_splits(q.shape[0], KV_HEADS, meta.max_seq_len, q.device, kv_bits=4, quads=True)
    quads, quad_best = [], None
    for tiles in QUAD_TILE_SWEEP if q.device.type == "cuda" else QUAD_TILE_SWEEP[:1]:
        for cap in QUAD_CAPS:
            entry = add(f"quads tiles={tiles} regs={cap or 'any'} splits={auto}",
                        lambda t=tiles, c=cap: paged_decode_attention(
                            q, k_cache, v_cache, meta, scale, auto, t, INT4_QUADS, max_registers=c))
            if entry and faster(entry, quad_best):
                quad_best, quads = entry, [tiles, cap]
    if quads and q.device.type == "cuda":
        tiles, cap = quads
        for splits in sorted({max(1, auto // 2), min(2 * auto, 64), min(4 * auto, 64)} - {auto}):
            add(f"quads tiles={tiles} regs={cap or 'any'} splits={splits}",
                lambda n=splits: paged_decode_attention(q, k_cache, v_cache, meta, scale, n, tiles,
                                                        INT4_QUADS, max_registers=cap))
    return {"candidates": results, "best": best}


def reference(q: torch.Tensor, k_cache, v_cache, meta: AttentionMetadata,
              scale: float) -> torch.Tensor | None:
    """The torch reference over the quantized cache as stored, where the batch is small enough to check."""
    from kernels.attention.reference import paged_attention_ref

    if q.shape[0] * meta.max_seq_len > REFERENCE_MAX_TOKENS:
        return None
    return paged_attention_ref(q, k_cache, v_cache, meta, scale)


def timed(run: Run, shape: str, name: str, config: str, base_ms: float, roof_ms: float,
          ref: torch.Tensor | None, fn) -> dict | None:
    """One candidate: checked against ref, timed, printed (WRONG past the bound); None where it fails to
    build."""
    try:
        got = fn()
    except Exception as error:  # one candidate that fails to build must not end the sweep
        skipped(config, error)
        return None
    err = rel_err(got, ref) if ref is not None else None
    return row("attention", shape, name, run.timer(lambda i: fn(), 1), base_ms, roof_ms, err, config)


def faster(entry: dict, best: dict | None) -> bool:
    """Whether a checked (or uncheckable) entry beats the best so far."""
    return entry.get("rel_err", 0.0) <= MAX_REL_ERR and (best is None or entry["ms"] < best["ms"])


def int8_sweep(run: Run, q: torch.Tensor, k_cache, v_cache, meta: AttentionMetadata, scale: float, shape: str,
               base_ms: float, roof_ms: float) -> dict:
    """The int8 cache under every config.INT8_DECODE_TILES candidate, at the automatic split count, half
    and twice it, under each config.INT8_DECODE_MODES kernel; the entry keeps all and names the fastest
    (its config: tiles, splits, mode)."""
    from kernels.attention.kernel import paged_decode_attention

    batch, context = q.shape[0], meta.max_seq_len
    auto = choose_num_splits(batch, KV_HEADS, context, q.device, kv_bits=8)
    ref = reference(q, k_cache, v_cache, meta, scale)
    candidates = [tiles for tiles in INT8_DECODE_TILES if tiles]
    if q.device.type != "cuda":
        candidates = candidates[:1]  # the interpreter (--smoke): one proves the path, each costs minutes
    results, best = {}, None
    for tiles in candidates:
        for splits in sorted({max(1, auto // 2), auto, min(2 * auto, 64)}):
            for mode in INT8_DECODE_MODES:
                config = f"tiles={tiles} splits={splits} int8_mode={mode}"
                entry = timed(run, shape, "decode KV int8 sweep", config, base_ms, roof_ms, ref,
                              lambda t=tiles, n=splits, m=mode: paged_decode_attention(
                                  q, k_cache, v_cache, meta, scale, n, t, int8_mode=m))
                if entry:
                    results[config] = entry
                    best = entry if faster(entry, best) else best
    return {"candidates": results, "best": best}
