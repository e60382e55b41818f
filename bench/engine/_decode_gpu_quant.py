"""Quantized-weight decode rows of bench/engine/decode_gpu.py: ms/step per weight scheme and KV dtype at the
Llama-3-8B shape, each against its own roofline (the bytes that scheme's step reads / copy bandwidth).

Each row builds the same random bf16 model (seed 0) and quantizes it with the engine's own transform
(EngineConfig.weights → engine/quantize), so the rows differ only in scheme. A step reads every weight but the
embedding table once — quantized codes, scales and lows as stored, plus the bf16 LM head and norms — and
every sequence's KV (scales included): roofline ms = those bytes / the copy bandwidth measured in the run.
"""
from __future__ import annotations

import gc
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine

# gpt-fast's int8 weight-only Llama-3-8B at bs1 on this kind (issue 12): a recorded anchor, not re-measured.
GPT_FAST_INT8_BS1_MS = 4.52
# row name → (EngineConfig.weights, kv_cache_dtype)
QUANT_ROWS = {"bf16": ("bf16", "auto"), "w8": ("w8", "auto"), "w4a16": ("w4a16", "auto"),
              "w4a16+kv-int4": ("w4a16", "int4"), "w8+kv-int8": ("w8", "int8"), "w8a8": ("w8a8", "auto")}


def weight_bytes(engine: LLMEngine) -> int:
    """Bytes a decode step reads of the model: parameters and buffers but the embedding and rope tables."""
    tensors = [*engine.model.named_parameters(), *engine.model.named_buffers()]
    return sum(t.numel() * t.element_size() for name, t in tensors
               if not name.startswith(("embed_tokens.", "rotary.")))


def fill_cache(engine: LLMEngine) -> None:
    """Real-looking KV (never zeros): floats normal, int codes uniform, scales small and positive."""
    kv = engine.kv_cache
    for codes in kv.k + kv.v:
        if codes.is_floating_point():
            codes.normal_()
        else:
            codes.random_(0, 127)  # int8 or packed uint8 codes
    for name, tensors in kv.scales.items():
        for t in tensors:
            if name.endswith("zero"):
                t.zero_()
            else:
                t.uniform_(0.01, 0.02)


def quant_row_engine(name: str, batches: list[int], max_context: int, args) -> LLMEngine:
    from bench.engine.decode_gpu import LLAMA3_8B, random_llama

    weights, kv_dtype = QUANT_ROWS[name]
    model = random_llama(LLAMA3_8B)
    blocks = max(batches) * -(-(max_context + args.steps * 4 + 16) // 16)
    return LLMEngine(EngineConfig(
        model_path="random:llama-3-8b", device="cuda", dtype="bfloat16", weights=weights,
        kv_cache_dtype=kv_dtype, num_kv_blocks=blocks, max_model_len=max_context + args.steps * 8 + 64,
        max_batch_tokens=512, max_num_seqs=max(batches), decode_lookahead=not args.no_lookahead),
        model=(LLAMA3_8B, model))


def quant_rows(args, results: dict, out_path: Path) -> None:
    """results["quant"]: one row per (--quant-rows name, batch, context), then the table is printed."""
    from bench.engine.decode_gpu import measure_ours, save

    names = [n for n in args.quant_rows.split(",") if n]
    unknown = [n for n in names if n not in QUANT_ROWS]
    if unknown:
        raise ValueError(f"--quant-rows: unknown {unknown}; known: {', '.join(QUANT_ROWS)}")
    batches = [int(b) for b in args.quant_batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    bw = results["copy_bandwidth_gbps"] * 1e9
    results["quant"] = rows = []
    results["gpt_fast_int8_bs1_ms_recorded"] = GPT_FAST_INT8_BS1_MS
    for name in names:
        engine = quant_row_engine(name, batches, max(contexts), args)
        fill_cache(engine)
        wbytes = weight_bytes(engine)
        kv_per_token = engine.kv_cache.bytes_per_block // engine.kv_cache.block_size  # all layers, K + V
        for context in contexts:
            for batch in batches:
                row = {"weights": name, "batch": batch, "context": context, "weight_bytes": wbytes,
                       "kv_bytes": batch * context * kv_per_token}
                row["roofline_ms"] = (wbytes + row["kv_bytes"]) / bw * 1e3
                row.update(measure_ours(engine, batch, context, args.steps))
                row["roofline_fraction"] = row["roofline_ms"] / row["ours_step_ms"]
                rows.append(row)
                print(f"{name} b={batch} ctx={context}: {row['ours_step_ms']:.2f} ms/step (graph "
                      f"{row.get('ours_graph_gpu_ms', float('nan')):.2f}), roofline "
                      f"{row['roofline_ms']:.2f} ms = {100 * row['roofline_fraction']:.0f}% (weights "
                      f"{wbytes / 1e9:.2f} GB)", flush=True)
                save(results, out_path)
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    print(quant_table(results))


def quant_table(results: dict) -> str:
    cols = ("weights", "batch", "ctx", "weights GB", "ours step ms", "graph GPU ms", "roofline ms",
            "roof/ours", "roof/graph")
    lines = ["| " + " | ".join(cols) + " |", "|---" + "|---:" * (len(cols) - 1) + "|"]
    for r in results.get("quant", []):
        graph = r.get("ours_graph_gpu_ms")
        graph_ms = f"{graph:.2f}" if graph else "—"
        roof_graph = f"{100 * r['roofline_ms'] / graph:.0f}%" if graph else "—"
        lines.append(
            f"| {r['weights']} | {r['batch']} | {r['context']} | {r['weight_bytes'] / 1e9:.2f} | "
            f"{r['ours_step_ms']:.2f} | {graph_ms} | {r['roofline_ms']:.2f} | "
            f"{100 * r['roofline_ms'] / r['ours_step_ms']:.0f}% | {roof_graph} |")
    lines.append(f"| gpt-fast int8 (recorded anchor, not measured in this run) | 1 | — | — | "
                 f"{GPT_FAST_INT8_BS1_MS:.2f} | — | — | — | — |")
    return "\n".join(lines)
