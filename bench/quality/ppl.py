"""Perplexity and greedy agreement of the embedded model per weight / KV scheme, against the fp32 baseline.

    .venv/bin/python -m bench.quality.ppl [--text-file PATH] [--tokens N] [--json OUT]
    .venv/bin/python -m bench.quality.ppl --tp 2 --tp-comm int8   # TP=2 (gloo, local ranks) vs TP=1

Baseline: the GGUF weights dequantized to fp32, fp32 KV cache. Text: Python's `pydoc_data.topics` (the
language reference; W8A8 calibrates on other text, engine/quantize/calibration.py) or PATH. Perplexity over
sliding windows of CONTEXT tokens moved by STRIDE: the first window scores all its tokens, every later one
only its last STRIDE (each scored token sees at least CONTEXT − STRIDE tokens of context). Greedy agreement:
GREEDY_PROMPTS prompts cut from the text, GREEDY_TOKENS tokens each; the share of positions equal to the
baseline's. The KV cache rows take their cache dtypes from bench/quality/kv_cache_ppl.kv_cache_configs().
With --tp N the rows are the baseline and the model sharded over N local ranks (gloo, one process each:
engine/tp/local_ranks.py), all-reducing in --tp-comm, gated at +0.2% (issue 16).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from bench.quality.kv_cache_ppl import default_text, kv_cache_configs, read_text
from contracts.sampling import SamplingParams
from engine.config import TP_COMMS, EngineConfig
from engine.llm_engine import LLMEngine
from engine.model_files import embedded_model_path
from engine.sequence_forward import forward_sequence
from engine.tokenizer import Tokenizer
from engine.tp.group import TPGroup
from engine.tp.local_ranks import run_local_ranks

CONTEXT = 512
STRIDE = 256
GREEDY_PROMPTS = 20
GREEDY_PROMPT_TOKENS = 32
GREEDY_TOKENS = 64


@dataclass(frozen=True)
class Config:
    name: str
    weights: str  # EngineConfig.weights
    gate: float | None  # bound on rel_delta vs baseline (issue 12); None: no gate
    two_sided: bool = False  # the gate bounds |rel_delta| ("within"), not just the increase
    kv_cache_dtype: str = "auto"  # EngineConfig.kv_cache_dtype (auto: the compute dtype, fp32 here)


def _kv(row: str) -> str:
    """The KV cache dtype of a kv_cache_ppl row: both harnesses measure the same KV configs."""
    return kv_cache_configs()[row]["kv_cache_dtype"]


CONFIGS = (
    Config("baseline", "auto", None),
    Config("w4a16-native", "w4a16", 0.001, two_sided=True),  # the same weights: within 0.1% either way
    Config("w8a8", "w8a8", 0.010),
    Config("kv-int8", "auto", 0.003, kv_cache_dtype=_kv("kv-int8")),
    Config("kv-int4", "auto", 0.030, kv_cache_dtype=_kv("kv-int4")),
    Config("w8a8+kv-int8", "w8a8", None, kv_cache_dtype=_kv("kv-int8")),
    Config("w4a16+kv-int4", "w4a16", None, kv_cache_dtype=_kv("kv-int4")),
)


def windows(num_tokens: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored target index within the window) covering targets 1..num_tokens-1 once."""
    out, start = [(0, min(CONTEXT, num_tokens), 1)], 0
    while start + CONTEXT < num_tokens:
        start += STRIDE
        end = min(start + CONTEXT, num_tokens)
        out.append((start, end, CONTEXT - STRIDE))  # the previous window scored targets up to here
    return out


def perplexity(engine: LLMEngine, tokens: list[int], bar: tqdm | None) -> float:
    """exp(mean NLL) of tokens[1:] given their preceding context (windows above), through a KV cache of the
    engine's kv_cache_dtype."""
    kv_cache_dtype = engine.config.kv_cache_dtype
    nll, count = 0.0, 0
    for start, end, first in windows(len(tokens)):
        window = tokens[start:end]
        # The engine's int4 key offsets too: the scratch cache stores keys as the engine's own cache does.
        hidden = forward_sequence(engine.model, window, kv_cache_dtype,
                                  engine.kv_cache.key_offsets)[first - 1:-1]
        logits = engine.model.compute_logits(hidden)
        targets = torch.tensor(window[first:])
        nll += F.cross_entropy(logits, targets, reduction="sum").item()
        count += len(targets)
        if bar is not None:
            bar.update(1)
    return math.exp(nll / count)


def greedy_prompts(tokens: list[int]) -> list[list[int]]:
    spacing = max(GREEDY_PROMPT_TOKENS, len(tokens) // GREEDY_PROMPTS)
    return [tokens[i * spacing:i * spacing + GREEDY_PROMPT_TOKENS] for i in range(GREEDY_PROMPTS)]


def match_rate(outputs: list[list[int]], reference: list[list[int]]) -> float:
    pairs = [(a, b) for out, ref in zip(outputs, reference, strict=True)
             for a, b in zip(out, ref, strict=True)]
    return sum(a == b for a, b in pairs) / len(pairs)


def engine_config(weights: str = "auto", tp_size: int = 1, tp_comm: str = "bf16",
                  kv_cache_dtype: str = "auto") -> EngineConfig:
    return EngineConfig(weights=weights, num_kv_blocks=GREEDY_PROMPTS * 6, max_num_seqs=GREEDY_PROMPTS,
                        tp_size=tp_size, tp_comm=tp_comm, kv_cache_dtype=kv_cache_dtype)


def tp_rank_run(group: TPGroup, tokens: list[int], prompts: list[list[int]], sampling: SamplingParams,
                tp_comm: str) -> tuple[float, list[list[int]]] | None:
    """One rank of the sharded model: every rank runs the perplexity forwards (their collectives pair up);
    rank 0 then generates while the others follow its steps. Rank 0 returns (ppl, greedy outputs)."""
    engine = LLMEngine(engine_config(tp_size=group.size, tp_comm=tp_comm), tp=group)
    ppl = perplexity(engine, tokens, None)
    if group.rank != 0:
        engine.follow()
        return None
    outputs = engine.generate(prompts, sampling)
    engine.stop_followers()
    return ppl, outputs


def gate_text(config: Config, rel_delta: float) -> str:
    delta, bound = (abs(rel_delta), "|rel_delta| <=") if config.two_sided else (rel_delta, "rel_delta <=")
    return f"{'PASS' if delta <= config.gate else 'FAIL'} ({bound} {config.gate:.1%})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text-file", type=Path, default=None, help="default: pydoc_data.topics")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of the text to score (default 4096)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument("--tp", type=int, default=1,
                        help="compare the baseline with the model sharded over this many local ranks")
    parser.add_argument("--tp-comm", choices=TP_COMMS, default="bf16", help="the TP ranks' all-reduce")
    args = parser.parse_args()
    if args.tp < 1:
        parser.error(f"--tp must be >= 1, got {args.tp}")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    text = read_text(parser, args.text_file) if args.text_file else default_text()
    tokens = Tokenizer.from_model(embedded_model_path()).encode(text)[:args.tokens]
    if len(tokens) < CONTEXT:
        parser.error(f"--tokens: the text gives {len(tokens)} tokens, fewer than the context {CONTEXT}")
    prompts = greedy_prompts(tokens)
    sampling = SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0.0, ignore_eos=True)
    configs = CONFIGS
    if args.tp > 1:
        configs = (CONFIGS[0], Config(f"tp{args.tp}-{args.tp_comm}", "auto", 0.002))
    results: dict[str, dict[str, float]] = {}
    agreement: dict[str, float] = {}
    reference: list[list[int]] = []
    start = time.perf_counter()
    with tqdm(total=len(configs) * len(windows(len(tokens))), desc="perplexity", unit="window") as bar:
        for config in configs:
            bar.set_postfix_str(config.name)
            if config.name.startswith("tp"):  # the ranks run in their own processes, one thread each
                ppl, outputs = run_local_ranks(tp_rank_run, args.tp, tokens, prompts, sampling,
                                               args.tp_comm)[0]
                bar.update(len(windows(len(tokens))))
            else:
                engine = LLMEngine(engine_config(config.weights, kv_cache_dtype=config.kv_cache_dtype))
                ppl = perplexity(engine, tokens, bar)
                outputs = engine.generate(prompts, sampling)
                del engine
            reference = reference or outputs
            base = results.get("baseline", {}).get("ppl", ppl)
            results[config.name] = {"ppl": ppl, "rel_delta": ppl / base - 1.0}
            agreement[config.name] = match_rate(outputs, reference)
    elapsed = time.perf_counter() - start

    print(f"\n{len(tokens)} tokens of {args.text_file or 'pydoc_data.topics'}, context {CONTEXT}, "
          f"stride {STRIDE}, greedy {GREEDY_TOKENS} tokens x {GREEDY_PROMPTS} prompts, {elapsed:.0f} s")
    print(f"{'config':16s} {'ppl':>9s} {'rel_delta':>10s} {'greedy match':>13s}  gate")
    for config in configs:
        r = results[config.name]
        gate = "" if config.gate is None else gate_text(config, r["rel_delta"])
        match = agreement[config.name]
        print(f"{config.name:16s} {r['ppl']:9.4f} {r['rel_delta']:+10.4%} {match:13.1%}  {gate}")
    if args.json:
        args.json.write_text(json.dumps({"tokens": len(tokens), "configs": results,
                                         "greedy_match_rate": agreement, "context": CONTEXT,
                                         "stride": STRIDE}, indent=2) + "\n")


if __name__ == "__main__":
    main()
