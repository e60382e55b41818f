"""bs1 greedy decode tokens/s on CPU: LLMEngine vs HF transformers on one GGUF, and the weight-bytes roofline.

    .venv/bin/python -m bench.engine.decode_cpu --tokens 128
"""
from __future__ import annotations

import argparse
import contextlib
import os
import time
from unittest import mock

import torch

from contracts.sampling import SamplingParams
from engine.config import EngineConfig
from engine.executors.cpu_flat import CpuFlatExecutor
from engine.llm_engine import LLMEngine
from engine.model_files import embedded_model_path, resolve_model_path

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
    """fp32 bytes a decode token must read: every weight but the embedding (one row), plus the LM head."""
    total = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    head = model.lm_head_weight.numel()  # tied: the embedding matrix, read in full by the logits matmul
    return 4 * (total + (head if model.lm_head is None else 0))


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2-135M)")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per run")
    parser.add_argument("--runs", type=int, default=3, help="alternating runs per engine; best reported")
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = resolve_model_path(args.model) if args.model else embedded_model_path()

    engine = LLMEngine(EngineConfig(model_path=str(path), num_kv_blocks=64, max_num_seqs=1))
    hf_model = None if args.skip_hf else load_hf(path)
    weight_bytes = decode_weight_bytes(engine.model)
    # Shared CPUs drift: alternate the contestants (and the bandwidth probe) and keep each one's best.
    bandwidths, ours_rates, hf_rates = [], [], []
    ours_ids = hf_ids = None
    for _ in range(args.runs):
        bandwidths.append(copy_bandwidth())
        rate, ours_ids = ours_decode(engine, args.tokens)
        ours_rates.append(rate)
        if hf_model is not None:
            rate, hf_ids = hf_decode(hf_model, args.tokens)
            hf_rates.append(rate)
    bandwidth, ours = max(bandwidths), max(ours_rates)
    roofline = bandwidth / weight_bytes

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.tokens} new tokens, "
          f"prompt {len(PROMPT)} tokens, best of {args.runs} alternating runs")
    print(f"copy bandwidth      {bandwidth / 1e9:8.1f} GB/s (read+write)")
    print(f"fp32 weight bytes   {weight_bytes / 1e6:8.1f} MB per decode token")
    print(f"roofline            {roofline:8.1f} tok/s")
    path = "FlatDecoder" if isinstance(engine.executor, CpuFlatExecutor) else "model forward"
    print(f"pdserve decode path {path:>8s} (bs1 steps)")
    print(f"pdserve engine      {ours:8.1f} tok/s  ({ours / roofline:.0%} of roofline)   "
          f"runs: {' '.join(f'{r:.1f}' for r in ours_rates)}")
    if hf_model is None:
        return
    hf = max(hf_rates)
    print(f"HF transformers     {hf:8.1f} tok/s  ({hf / roofline:.0%} of roofline)   "
          f"runs: {' '.join(f'{r:.1f}' for r in hf_rates)}")
    print(f"ratio pdserve / HF  {ours / hf:8.2f}x   same tokens: {ours_ids == hf_ids}")


if __name__ == "__main__":
    main()
