"""Llama-3-8B-shape decode/prefill on CUDA: our engine vs HF transformers eager vs the roofline, in one run.

    python -m bench.engine.decode_gpu --out bench/results/decode_gpu.json     # CUDA machine, repo root
    python -m bench.engine.decode_gpu --quant-only --quant-rows bf16,w8,w4a16,w4a16+kv-int4 --contexts 512

Random bf16 weights drawn on the GPU. Ceilings measured in the same run: copy bandwidth (large D2D copy,
bytes read + written) and bf16 GEMM peak (8192³). Decode roofline = (all weights but the embedding table +
batch × context KV) / copy bandwidth. "ours" = wall time of `LLMEngine.step()` (schedule → graph replay →
sample → host sync → postprocess); "graph" = GPU time of the replayed graph alone; "eager" = graphs off.
HF = `LlamaForCausalLM` (sdpa, no compile) on our weight tensors, one token per step over a DynamicCache
pre-filled with random KV. Also: prefill tok/s + MFU at 2k tokens, peak memory, SmolLM2-135M decode tok/s.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from bench._cuda import copy_bandwidth, cuda_missing, median_event_ms
from contracts.kv_cache_spec import KVCacheSpec
from contracts.sampling import SamplingParams
from engine.config import EngineConfig, ModelConfig
from engine.executors.eager import EagerExecutor
from engine.kv_cache import KVCache, dtype_name
from engine.llm_engine import LLMEngine
from engine.model import LlamaModel
from engine.random_models import PRESETS, build_random_model
from kernels.attention.metadata import AttentionMetadata, SeqSpan
from kernels.registry import KernelRegistry

LLAMA3_8B = PRESETS["llama-3-8b"]
BF16 = torch.bfloat16
GiB = 1 << 30


def gemm_peak(n: int = 8192) -> float:
    """FLOP/s of an n³ bf16 matmul on random data (median of 20)."""
    a, b = torch.randn(n, n, dtype=BF16, device="cuda"), torch.randn(n, n, dtype=BF16, device="cuda")
    return 2 * n ** 3 / (median_event_ms(lambda: a @ b, repeats=20, warmup=5) * 1e-3)


def random_llama(config: ModelConfig, seed: int = 0, std: float = 0.02) -> LlamaModel:
    """Weights drawn on the GPU (no 16 GB host copy); norm gains at 1, like a trained model's scale."""
    return build_random_model(config, BF16, "cuda", seed=seed, std=std)


def linears_floor_ms(model: LlamaModel, results: dict, batches: tuple[int, ...] = (1, 16)) -> None:
    """GPU ms of a step's projections + LM head alone (graph-replayed matmuls): the step minus this is the
    cost of everything else (norms, rotary, KV store, attention, activation). Per BLAS library."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    linear = KernelRegistry.triton().linear
    floor = results["linears_floor_ms"] = {}
    # cublas / cublaslt: F.linear under each BLAS library; pdserve: kernels.linear.linear (the model's).
    for lib, batch in ((lib, b) for lib in ("cublas", "cublaslt", "pdserve") for b in batches):
        torch.backends.cuda.preferred_blas_library("cublas" if lib == "pdserve" else lib)
        product = linear if lib == "pdserve" else torch.nn.functional.linear
        xs = {w.shape[1]: torch.randn(batch, w.shape[1], dtype=BF16, device="cuda") for w in weights}
        for _ in range(2):  # warm-up: cuBLAS picks kernels and workspaces outside the capture
            [product(xs[w.shape[1]], w) for w in weights]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            [product(xs[w.shape[1]], w) for w in weights]
        floor[f"{lib}_bs{batch}"] = median_event_ms(graph.replay, repeats=20)
    torch.backends.cuda.preferred_blas_library("cublas")
    print(f"linears alone: {floor}", flush=True)


def prefill_flops(c: ModelConfig, tokens: int) -> float:
    """Matmul FLOPs of a causal prefill (layers for every token, LM head for the last one)."""
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    per_layer = c.hidden_size * (q + 2 * kv) + q * c.hidden_size + 3 * c.hidden_size * c.intermediate_size
    attention = 2 * tokens * tokens * q  # QK^T and PV over the causal half: 2 * (2 * T * T/2 * Hq * D)
    return c.num_layers * (2 * tokens * per_layer + attention) + 2 * c.hidden_size * c.vocab_size


def start_decoding(engine: LLMEngine, batch: int, context: int, tag: str) -> list[str]:
    """Sequences enter decode as when a prefill worker's KV lands: reserve, then activate."""
    gen = torch.Generator().manual_seed(batch * 7919 + context)
    ids = []
    for i in range(batch):
        prompt = torch.randint(0, engine.model_config.vocab_size, (context,), generator=gen).tolist()
        request_id = f"{tag}-{i}"
        if engine.reserve(request_id, prompt, SamplingParams(max_tokens=100_000, ignore_eos=True)) is None:
            raise RuntimeError(f"KV cache too small for {batch} x {context}")
        engine.activate(request_id, int(prompt[-1]))
        ids.append(request_id)
    return ids


def step_wall_ms(engine: LLMEngine, steps: int, warmup: int = 3, eager: EagerExecutor | None = None) -> float:
    """Median wall ms of an engine step; `eager`: each step runs through it instead (no graphs)."""
    times = []
    for _ in range(warmup + steps):
        t0 = time.perf_counter()
        if eager is None:
            engine.step()  # ends in the host sync on the sampled ids
        else:
            batch = engine.schedule()
            engine.postprocess(batch, eager.execute(batch))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[warmup:])


def measure_ours(engine: LLMEngine, batch: int, context: int, steps: int) -> dict:
    ids = start_decoding(engine, batch, context, f"b{batch}c{context}")
    row: dict = {"ours_step_ms": step_wall_ms(engine, steps)}
    graphs = getattr(engine.executor, "graphs", None)
    out = engine.schedule()
    if graphs is not None and engine.executor.graphed(out):
        # The same step replayed back to back (it rewrites the same KV slots): GPU time alone.
        row["ours_graph_gpu_ms"] = median_event_ms(lambda: graphs.run(out.chunks), repeats=steps)
    engine.postprocess(out, engine.execute(out))
    if engine.lookahead is not None:
        engine.lookahead.drop()  # the eager steps below launch nothing ahead
    eager = EagerExecutor(engine.model, engine.kv_cache, torch.device(engine.config.device))
    row["ours_eager_step_ms"] = step_wall_ms(engine, max(steps // 2, 4), warmup=2, eager=eager)
    for rid in ids:
        engine.abort(rid)
    return row


def measure_prefill(engine: LLMEngine, tokens: int, runs: int = 3) -> float:
    """Median wall ms of one engine step that prefills a `tokens`-token prompt (first run = warm-up)."""
    times = []
    for r in range(runs + 1):
        prompt = torch.randint(0, engine.model_config.vocab_size, (tokens,)).tolist()
        seq = engine.add_request(f"prefill-{r}", prompt, SamplingParams(max_tokens=4, ignore_eos=True))
        times.append(step_wall_ms(engine, 1, warmup=0))
        if seq.num_computed_tokens != tokens:
            raise RuntimeError(f"the prefill step computed {seq.num_computed_tokens} tokens, not {tokens}")
        engine.abort(seq.request_id)
    return statistics.median(times[1:])


def hf_sharing_weights(model: LlamaModel):
    """LlamaForCausalLM whose parameters are views of ours (no copy: our fused rows are HF's tensors)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c, s = model.config, model.config.rope_scaling
    hf_config = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim, max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta, tie_word_embeddings=False, attn_implementation="sdpa",
        rope_scaling={"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                      "high_freq_factor": s.high_freq_factor, "rope_theta": c.rope_theta,
                      "original_max_position_embeddings": s.original_max_position_embeddings})
    with torch.device("meta"):
        hf = LlamaForCausalLM(hf_config)
    q, kv, inter = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
    state = {"model.embed_tokens.weight": model.embed_tokens.weight, "model.norm.weight": model.norm.weight,
             "lm_head.weight": model.lm_head.weight}
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        qkv, gate_up = layer.self_attn.qkv_proj.weight, layer.mlp.gate_up_proj.weight
        state.update({
            p + "self_attn.q_proj.weight": qkv[:q], p + "self_attn.k_proj.weight": qkv[q:q + kv],
            p + "self_attn.v_proj.weight": qkv[q + kv:],
            p + "self_attn.o_proj.weight": layer.self_attn.o_proj.weight,
            p + "mlp.gate_proj.weight": gate_up[:inter], p + "mlp.up_proj.weight": gate_up[inter:],
            p + "mlp.down_proj.weight": layer.mlp.down_proj.weight,
            p + "input_layernorm.weight": layer.input_layernorm.weight,
            p + "post_attention_layernorm.weight": layer.post_attention_layernorm.weight})
    hf.load_state_dict(state, assign=True, strict=True)
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf_config).to(model.embed_tokens.weight.device)
    leftovers = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
    if leftovers:
        raise RuntimeError(f"HF model still has meta tensors: {leftovers[:3]}")
    return hf.eval()


@torch.inference_mode()
def parity(model: LlamaModel, hf, tokens: int = 40) -> dict:
    """Last-position logits of ours vs HF on one random prompt: checks the weight mapping."""
    c, device, dtype = model.config, model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
    ids = torch.randint(0, c.vocab_size, (tokens,), device=device)
    blocks = -(-tokens // 16)
    kv = KVCache(KVCacheSpec(16, c.num_kv_heads, c.head_dim, dtype_name(dtype)), c.num_layers, blocks, device)
    meta = AttentionMetadata.from_spans([SeqSpan(0, tokens, tokens, tuple(range(blocks)), 0)],
                                        list(range(tokens)), 16, device)
    ours = model.compute_logits(model(ids, torch.arange(tokens, device=device), meta, kv)[-1:])[0]
    theirs = hf(input_ids=ids[None]).logits[0, -1].float()
    cos = torch.nn.functional.cosine_similarity(ours, theirs, dim=0).item()
    return {"logits_cosine": cos, "max_abs_diff": (ours - theirs).abs().max().item(),
            "same_argmax": bool(ours.argmax() == theirs.argmax())}


@torch.inference_mode()
def hf_decode_ms(hf, batch: int, context: int, steps: int) -> float:
    from transformers import DynamicCache

    c, device, dtype = hf.config, hf.device, hf.dtype
    cache = DynamicCache(config=c)
    shape = (batch, c.num_key_value_heads, context, c.head_dim)
    for layer in range(c.num_hidden_layers):
        k, v = (torch.randn(shape, dtype=dtype, device=device) for _ in "kv")
        cache.update(k, v, layer)
    ids = torch.randint(0, c.vocab_size, (batch, 1), device=device)

    def step() -> None:
        nonlocal ids
        logits = hf(input_ids=ids, past_key_values=cache, use_cache=True).logits
        ids = logits[:, -1].argmax(-1, keepdim=True)

    return median_event_ms(step, repeats=steps, warmup=2)


def save(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")


def table(results: dict) -> str:
    keys = ("ours_step_ms", "ours_graph_gpu_ms", "ours_eager_step_ms", "hf_ms", "roofline_ms")
    cols = ("batch", "ctx", "ours step ms", "graph GPU ms", "eager step ms", "HF eager ms", "roofline ms",
            "roof/ours")
    lines = ["| " + " | ".join(cols) + " |", "|---:" * len(cols) + "|"]
    for r in results["decode"]:
        cells = [f"{r[k]:.2f}" if isinstance(r.get(k), float) else "—" for k in keys]
        pct = f"{100 * r['roofline_ms'] / r['ours_step_ms']:.0f}%" if "ours_step_ms" in r else "—"
        lines.append(f"| {r['batch']} | {r['context']} | {' | '.join(cells)} | {pct} |")
    return "\n".join(lines)


def bench_ours(model: LlamaModel, points: list[tuple[int, int]], args, results: dict, out_path: Path) -> None:
    c = model.config
    # A decode step reads every parameter but the embedding table (one row per token), plus its KV.
    wbytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * 2  # K and V, bf16
    bw = results["copy_bandwidth_gbps"] * 1e9
    free = torch.cuda.mem_get_info()[0]
    spare = 6 * GiB  # graph pools, logits, prefill activations, cuBLAS workspaces
    need = {(b, c): b * (-(-(c + args.steps * 3 + 16) // 16)) for b, c in points}  # KV blocks per point
    feasible = [p for p in points if need[p] * 16 * per_token + spare <= free]
    results.update(weight_bytes_per_step=wbytes, decode=[])
    for b, c in points:
        kv = b * c * per_token
        row = {"batch": b, "context": c, "kv_bytes": kv, "roofline_ms": (wbytes + kv) / bw * 1e3}
        if (b, c) not in feasible:
            row["skipped"] = (f"KV {kv / 1e9:.1f} GB + weights {wbytes / 1e9:.1f} GB exceed "
                              f"{free / 1e9:.1f} GB free")
        results["decode"].append(row)
    blocks = max([need[p] for p in feasible] + [-(-args.prefill_tokens // 16) + 1])
    max_len = max(max(c for _, c in points) + args.steps * 4, args.prefill_tokens) + 64
    engine = LLMEngine(
        EngineConfig(device="cuda", dtype="bfloat16", num_kv_blocks=blocks, max_model_len=max_len,
                     max_batch_tokens=args.prefill_tokens, max_num_seqs=max([b for b, _ in feasible] + [1]),
                     decode_lookahead=not args.no_lookahead),
        model=(model.config, model))
    for cache in engine.kv_cache.k + engine.kv_cache.v:
        cache.normal_()  # attention reads real-looking KV, never zeros
    graphs = getattr(engine.executor, "graphs", None)
    results["graph_buckets"] = list(graphs.captured_buckets) if graphs is not None else []
    print(f"# engine ready: {blocks} KV blocks, graphs for {results['graph_buckets']}", flush=True)
    for row in results["decode"]:
        if "skipped" not in row:
            row.update(measure_ours(engine, row["batch"], row["context"], args.steps))
            print(f"ours b={row['batch']} ctx={row['context']}: {row['ours_step_ms']:.2f} ms/step (graph "
                  f"{row.get('ours_graph_gpu_ms', float('nan')):.2f}, eager {row['ours_eager_step_ms']:.2f}, "
                  f"roofline {row['roofline_ms']:.2f})", flush=True)
            save(results, out_path)
    ms = measure_prefill(engine, args.prefill_tokens)
    flops = prefill_flops(model.config, args.prefill_tokens)
    results["prefill"] = {"tokens": args.prefill_tokens, "step_ms": ms,
                          "tokens_per_s": args.prefill_tokens / ms * 1e3, "tflops": flops / ms / 1e9,
                          "mfu": flops / ms / 1e9 / results["gemm_bf16_tflops"]}
    results["peak_memory_gib_ours"] = torch.cuda.max_memory_allocated() / GiB
    print(f"prefill: {results['prefill']}; peak memory {results['peak_memory_gib_ours']:.1f} GiB", flush=True)


def bench_hf(model: LlamaModel, args, results: dict, out_path: Path) -> None:
    import transformers

    results["machine"]["transformers"] = transformers.__version__
    torch.cuda.reset_peak_memory_stats()
    hf = hf_sharing_weights(model)
    results["parity_ours_vs_hf"] = parity(model, hf)
    print(f"parity: {results['parity_ours_vs_hf']}", flush=True)
    for row in results["decode"]:
        if torch.cuda.mem_get_info()[0] < row["kv_bytes"] + 4 * GiB:
            row["hf_skipped"] = "does not fit"
            continue
        try:
            row["hf_ms"] = hf_decode_ms(hf, row["batch"], row["context"], args.hf_steps)
        except torch.cuda.OutOfMemoryError:
            row["hf_skipped"] = "out of memory"
        gc.collect()
        torch.cuda.empty_cache()
        print(f"HF b={row['batch']} ctx={row['context']}: {row.get('hf_ms', row.get('hf_skipped'))}",
              flush=True)
        save(results, out_path)
    results["peak_memory_gib_hf"] = torch.cuda.max_memory_allocated() / GiB


def section(results: dict, name: str, fn, *fn_args) -> None:
    """Run one part; a failure is recorded and the run goes on (one device call must yield every figure)."""
    try:
        fn(*fn_args)
    except Exception as err:  # noqa: BLE001 - reported in the results, traceback on stderr
        traceback.print_exc()
        results.setdefault("errors", {})[name] = f"{type(err).__name__}: {err}"
    gc.collect()
    torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8,16,32,128")
    parser.add_argument("--contexts", default="512,4096")
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps per point (median)")
    parser.add_argument("--hf-steps", type=int, default=8)
    parser.add_argument("--prefill-tokens", type=int, default=2048)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--no-lookahead", action="store_true",
                        help="EngineConfig(decode_lookahead=False): launch a step after reading the last")
    parser.add_argument("--quant-rows", default="",
                        help="quantized-weight rows (bench/engine/_decode_gpu_quant.py), e.g. "
                             "bf16,w8,w4a16,w4a16+kv-int4: each at --quant-batches x --contexts")
    parser.add_argument("--quant-batches", default="1,16")
    parser.add_argument("--quant-only", action="store_true", help="only the --quant-rows rows")
    parser.add_argument("--out", default="bench/results/decode_gpu.json")
    args = parser.parse_args(argv)
    if cuda_missing(__file__):
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import triton

    out_path = Path(args.out)
    points = [(b, c) for c in map(int, args.contexts.split(",")) for b in map(int, args.batches.split(","))]
    props = torch.cuda.get_device_properties(0)
    machine = {"gpu": props.name, "sms": props.multi_processor_count, "gpu_mem_gib": props.total_memory / GiB,
               "host": platform.node(), "torch": torch.__version__, "cuda": torch.version.cuda,
               "triton": triton.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    command = "python -m bench.engine.decode_gpu " + " ".join(sys.argv[1:] if argv is None else argv)
    results: dict = {"command": command, "machine": machine,
                     "model": "Llama-3-8B shape, random bf16 weights (std 0.02), KV block 16"}
    torch.manual_seed(0)
    results["copy_bandwidth_gbps"] = copy_bandwidth() / 1e9
    results["gemm_bf16_tflops"] = gemm_peak() / 1e12
    print(f"# {props.name}: copy {results['copy_bandwidth_gbps']:.0f} GB/s, "
          f"GEMM {results['gemm_bf16_tflops']:.0f} TFLOP/s", flush=True)
    torch.cuda.reset_peak_memory_stats()
    model = None if args.quant_only else random_llama(LLAMA3_8B)
    if model is not None:
        section(results, "linears", linears_floor_ms, model, results)
        section(results, "ours", bench_ours, model, points, args, results, out_path)
        save(results, out_path)
    if model is not None and not args.skip_hf:
        section(results, "hf", bench_hf, model, args, results, out_path)
    del model
    if args.quant_rows:
        from bench.engine._decode_gpu_quant import quant_rows

        section(results, "quant", quant_rows, args, results, out_path)
    if not args.skip_smollm2 and not args.quant_only:
        from bench.engine._decode_gpu_smollm2 import smollm2_tok_s

        section(results, "smollm2", lambda: results.__setitem__("smollm2_135m_bf16_bs1", smollm2_tok_s()))
        print(f"SmolLM2-135M: {results.get('smollm2_135m_bf16_bs1')}", flush=True)
    save(results, out_path)
    if not args.quant_only:
        print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
