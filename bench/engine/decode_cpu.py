"""bs1 greedy decode tokens/s on CPU: LLMEngine (fp32, W4A16, W8A8, W8) vs HF vs llama.cpp on one GGUF, and
each roofline.

    .venv/bin/python -m bench.engine.decode_cpu --tokens 128 [--threads N] [--kv-cache auto int8 int4]

Contestants run interleaved (one run each per round, the box's speed drifts); the table gives each one's
median and best tokens/s and our medians over llama.cpp's against the issue's 0.7x bar.
Roofline per contestant (of the best run): copy bandwidth / the bytes its decode token reads (quantized
weights count as read: W8A8's int8 values as FBGEMM's fp16 copy; llama.cpp: the GGUF's tensors as
stored). "same tokens": positions equal to the first contestant's greedy output. `--kv-cache`: every
contestant of ours once per KV cache dtype (named "<contestant>+kv-<dtype>" past auto). llama.cpp runs through
`llama-cpp-python`, a benchmark-only dependency (`make bench-deps`, requirements-bench.txt); without it
that row is skipped with a message.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from pathlib import Path
from unittest import mock

import torch

from contracts.sampling import SamplingParams
from engine.config import KV_CACHE_DTYPES, EngineConfig
from engine.executors.cpu_flat import CpuFlatExecutor
from engine.llm_engine import LLMEngine
from engine.model_files import embedded_model_path, resolve_model_path
from engine.quantize.w8a8 import W8A8Linear

# Plain token ids (SmolLM2 vocabulary): the start of a story, 20 tokens.
PROMPT = [6403, 1980, 253, 655, 28, 281, 253, 1165, 6560, 418, 260, 5595, 282, 253, 1109, 3150, 28, 665,
          4161, 354]


def copy_bandwidth(num_bytes: int = 256 << 20, repeats: int = 5) -> float:
    """Best-of-N bytes/s moved (read + write) by one large tensor copy: the memory roof this box offers."""
    src = torch.ones(num_bytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages first
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * num_bytes / best


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode token must read: every weight (parameters, and the buffers quantized projections keep
    their weights in) but the embedding (one row) and the rope tables, plus the LM head."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    total = sum(t.numel() * t.element_size() for name, t in tensors
                if "embed_tokens" not in name and "rotary" not in name)
    head = model.lm_head_weight  # tied: the embedding matrix, read in full by the logits matmul
    # W8A8 on CPU reads FBGEMM's fp16 copy of its int8 values: one byte more per weight than the buffer.
    fp16_extra = sum(m.weight_int8.numel() for m in model.modules()
                     if isinstance(m, W8A8Linear) and m.weight_int8.device.type == "cpu")
    return total + fp16_extra + (head.numel() * head.element_size() if model.lm_head is None else 0)


def ours_decode(engine: LLMEngine, new_tokens: int) -> tuple[float, list[int]]:
    """tokens/s over decode steps only (after the first token), and the generated ids."""
    sampling = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    seq = engine.add_request(f"bench-{time.monotonic_ns()}", PROMPT, sampling)
    engine.step()  # prefill + first token
    start = time.perf_counter()
    while engine.has_work():
        engine.step()
    elapsed = time.perf_counter() - start
    return (seq.num_output_tokens - 1) / elapsed, seq.output_token_ids


class _Stamps:
    """HF streamer that timestamps every put(): the prompt first, then each generated token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def load_llama_cpp(path, threads: int):
    """llama.cpp on the same GGUF with `threads` threads; None, with a message, when the module is missing."""
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama.cpp: skipped, `llama_cpp` is not installed (make bench-deps installs llama-cpp-python)")
        return None
    return Llama(model_path=str(path), n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)


def llama_cpp_decode(model, new_tokens: int) -> tuple[float, list[int]]:
    """bs1 greedy (top_k 1, temperature 0, no penalties) from an empty cache; tokens/s after the first."""
    model.reset()
    times: list[float] = []
    out: list[int] = []
    for token in model.generate(PROMPT, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                reset=True):
        times.append(time.perf_counter())
        out.append(token)
        if len(out) == new_tokens:  # never stops at EOS by itself: the same count as the others
            break
    return (len(times) - 1) / (times[-1] - times[0]), out


def gguf_tensor_bytes(path) -> int:
    """Bytes of every tensor in the GGUF as stored: what llama.cpp's decode token reads (the tied embedding
    is read in full as the LM head)."""
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors)


def load_hf(path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, modeling_utils
    from transformers.utils import is_accelerate_available

    # transformers guards gguf_file= behind `accelerate`, which its CPU path without device_map never uses.
    guard = (contextlib.nullcontext() if is_accelerate_available()
             else mock.patch.object(modeling_utils, "is_accelerate_available", lambda: True))
    with guard:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=torch.float32)
    return model.eval()


def hf_decode(model: torch.nn.Module, new_tokens: int) -> tuple[float, list[int]]:
    stamps = _Stamps()
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, streamer=stamps)
    first, last = stamps.times[1], stamps.times[-1]  # times[0] is the prompt
    return (len(stamps.times) - 2) / (last - first), out[0, len(PROMPT):].tolist()


# Contestant → EngineConfig.weights. "w8" is W8A8 (int8 weights and per-token int8 activations);
# "w8-weight-only" is --weights w8 (per-channel int8 weights, fp32 activations: kernels/cpu_quant on CPU).
# "w4a16-torch-ops": w4a16-native with FlatDecoder's per-op torch path instead of its one-C-call bs1 step
# (kernels/cpu_quant/step.py): the before/after of that step in one run.
CONTESTANTS = {"fp32": "auto", "w4a16-native": "w4a16", "w8": "w8a8", "w8-weight-only": "w8",
               "w4a16-torch-ops": "w4a16"}
TORCH_OPS = ("w4a16-torch-ops",)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2-135M)")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per run")
    parser.add_argument("--runs", type=int, default=3,
                        help="interleaved rounds (every contestant once a round); median and best reported")
    parser.add_argument("--weights", nargs="+", choices=list(CONTESTANTS), default=list(CONTESTANTS),
                        help="our contestants (default: all; the first is the tokens reference)")
    parser.add_argument("--kv-cache", nargs="+", choices=KV_CACHE_DTYPES, default=["auto"],
                        help="KV cache dtypes of our contestants (default: auto, the compute dtype)")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--skip-llama-cpp", action="store_true")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads, and llama.cpp's (default: torch's own count)")
    parser.add_argument("--json", type=Path, default=None,
                        help="append this run's rates, medians and load averages to this JSON list")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = resolve_model_path(args.model) if args.model else embedded_model_path()

    engines = {name if kv == "auto" else f"{name}+kv-{kv}": LLMEngine(EngineConfig(
        model_path=str(path), weights=CONTESTANTS[name], kv_cache_dtype=kv, num_kv_blocks=64, max_num_seqs=1))
        for name in args.weights for kv in args.kv_cache}
    for name, engine in engines.items():
        if name.split("+")[0] in TORCH_OPS and isinstance(engine.executor, CpuFlatExecutor):
            engine.executor.flat.step = None
    hf_model = None if args.skip_hf else load_hf(path)
    llama = None if args.skip_llama_cpp else load_llama_cpp(path, torch.get_num_threads())
    load_before = os.getloadavg()
    # Shared CPUs drift: alternate the contestants (and the bandwidth probe) and keep each one's best.
    bandwidths: list[float] = []
    others = [*([] if hf_model is None else ["HF"]), *([] if llama is None else ["llama.cpp"])]
    rates: dict[str, list[float]] = {name: [] for name in [*engines, *others]}
    ids: dict[str, list[int]] = {}
    for _ in range(args.runs):
        bandwidths.append(copy_bandwidth())
        for name, engine in engines.items():
            rate, ids[name] = ours_decode(engine, args.tokens)
            rates[name].append(rate)
        if hf_model is not None:
            rate, ids["HF"] = hf_decode(hf_model, args.tokens)
            rates["HF"].append(rate)
        if llama is not None:
            rate, ids["llama.cpp"] = llama_cpp_decode(llama, args.tokens)
            rates["llama.cpp"].append(rate)
    bandwidth = max(bandwidths)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.tokens} new tokens, "
          f"prompt {len(PROMPT)} tokens, {args.runs} interleaved rounds (median and best)")
    if llama is not None:
        import llama_cpp

        print(f"llama-cpp-python {llama_cpp.__version__}, {llama.n_threads} threads")
    print(f"copy bandwidth      {bandwidth / 1e9:8.1f} GB/s (read+write)")
    reference = ids[next(iter(engines))]
    print(f"{'contestant':22s} {'path':>13s} {'MB/token':>9s} {'median':>7s} {'best':>7s} {'roofline':>9s} "
          f"{'vs llama.cpp':>13s} {'same tokens':>12s}  runs")
    # The bar for our contestants: ≥ 0.7× llama.cpp's tokens/s (medians, same run).
    llama_median = statistics.median(rates["llama.cpp"]) if "llama.cpp" in rates else None
    # HF runs the same fp32 weights as our fp32 contestant: it shares that roofline (none without it).
    weight_bytes = {name: decode_weight_bytes(engine.model) for name, engine in engines.items()}
    if "fp32" in weight_bytes and hf_model is not None:
        weight_bytes["HF"] = weight_bytes["fp32"]
    if llama is not None:
        weight_bytes["llama.cpp"] = gguf_tensor_bytes(path)
    for name, runs in rates.items():
        engine = engines.get(name)
        path_name = {"HF": "HF generate", "llama.cpp": "llama-cpp-py"}[name] if engine is None else (
            "FlatDecoder" if isinstance(engine.executor, CpuFlatExecutor) else "model forward")
        same = sum(a == b for a, b in zip(ids[name], reference, strict=True))
        median, best, size = statistics.median(runs), max(runs), weight_bytes.get(name)
        roof = "-" if size is None else f"{best / (bandwidth / size):.0%}"
        megabytes = "-" if size is None else f"{size / 1e6:.1f}"
        ratio = "-"
        if llama_median is not None and name != "llama.cpp":
            bar = "" if engine is None else (" ok" if median >= 0.7 * llama_median else " <0.7")
            ratio = f"{median / llama_median:.2f}x{bar}"
        print(f"{name:22s} {path_name:>13s} {megabytes:>9s} {median:7.1f} {best:7.1f} {roof:>9s} "
              f"{ratio:>13s} {same:5d}/{len(reference):<6d}  {' '.join(f'{r:.1f}' for r in runs)}")
    if args.json is not None:
        medians = {name: statistics.median(runs) for name, runs in rates.items()}
        record = {"threads": torch.get_num_threads(), "tokens": args.tokens, "runs": rates,
                  "medians": medians,
                  "vs_llama_cpp": {name: m / llama_median for name, m in medians.items()
                                   if llama_median is not None and name != "llama.cpp"},
                  "copy_gb_s": bandwidth / 1e9, "loadavg_before": load_before,
                  "loadavg_after": os.getloadavg()}
        records = json.loads(args.json.read_text()) if args.json.exists() else []
        args.json.write_text(json.dumps([*records, record], indent=1) + "\n")


if __name__ == "__main__":
    main()
