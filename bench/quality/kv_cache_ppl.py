"""Perplexity and KL divergence of the embedded model per KV cache dtype (fp32 KV baseline vs int8 / int4),
sliding windows, on one or more texts.

    .venv/bin/python -m bench.quality.kv_cache_ppl [--tokens N] [--text-file PATH ...] [--json OUT]
        [--offset-jitter N]

`--offset-jitter N` adds N kv-int4 rows whose key offsets each moved by one float16 step up, down or not at
all (seeded): changes far below any format's, whose spread is the int4 row's noise floor on that text.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from engine.config import EngineConfig
from engine.kv_cache import KVCache
from engine.model_files import load_model, resolve_model_path
from engine.quantize.kv_balance import balance_keys
from engine.quantize.kv_offsets import calibration_ids
from engine.tokenizer import Tokenizer
from kernels.attention.metadata import AttentionMetadata, SeqSpan

CONTEXT = 512
STRIDE = 256  # each window after the first scores only its last STRIDE tokens (they see >= 256 of context)


def kv_cache_configs() -> dict[str, dict[str, str]]:
    """EngineConfig overrides of each KV cache config the quality harness measures, by row name."""
    return {"baseline": {"kv_cache_dtype": "float32"}, "kv-int8": {"kv_cache_dtype": "int8"},
            "kv-int4": {"kv_cache_dtype": "int4"}}


def default_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def read_text(parser: argparse.ArgumentParser, path: Path) -> str:
    """The text of a --text-file, or a usage error naming the flag."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        parser.error(f"--text-file {path}: cannot read it as UTF-8 text ({e.__class__.__name__}: {e})")


@torch.inference_mode()
def window_log_probs(model, model_config, config: EngineConfig, ids: list[int],
                     key_offsets: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(log-probabilities [n, vocab], targets [n]) of each window's scored tokens under `model` with a KV
    cache built from `config` (ctx CONTEXT, STRIDE) and the int4 key offsets given."""
    blocks = -(-CONTEXT // config.block_size)
    kv = KVCache.for_model(model_config, config, key_offsets)
    out = []
    for start in range(0, max(len(ids) - 1, 1), STRIDE):
        window = ids[start:start + CONTEXT + 1]
        if len(window) < 2:
            break
        inputs, targets = window[:-1], torch.tensor(window[1:])
        n = len(inputs)
        span = SeqSpan(0, n, n, tuple(range(blocks))[: -(-n // config.block_size)], 0)
        meta = AttentionMetadata.from_spans([span], list(range(n)), config.block_size)
        hidden = model(torch.tensor(inputs), torch.arange(n), meta, kv)
        first = 0 if start == 0 else n - min(STRIDE, n)
        out.append((model.compute_logits(hidden[first:]).float().log_softmax(-1), targets[first:]))
        if start + CONTEXT + 1 >= len(ids):
            break
    return out


def mean_nll(scored: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    return (sum(-lp.gather(1, t.view(-1, 1)).sum().item() for lp, t in scored)
            / sum(len(t) for _, t in scored))


def mean_kl(reference: list[tuple[torch.Tensor, torch.Tensor]],
            other: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """KL(reference ‖ other) of the next-token distributions, nats per scored token."""
    total = sum((ref.exp() * (ref - oth)).sum().item() for (ref, _), (oth, _) in zip(reference, other,
                                                                                     strict=True))
    return total / sum(len(t) for _, t in reference)


def record_row(rows: dict[str, dict[str, float]], name: str, scored: list[tuple[torch.Tensor, torch.Tensor]],
               reference: list[tuple[torch.Tensor, torch.Tensor]], tokens: int, seconds: float) -> None:
    """rows[name] = perplexity, its delta against rows["baseline"] (or itself, first), KL(reference ‖ it)
    and the text's tokens; prints the row."""
    ppl = math.exp(mean_nll(scored))
    base = rows.get("baseline", {}).get("ppl", ppl)
    rows[name] = {"ppl": ppl, "rel_delta": ppl / base - 1.0, "kl": mean_kl(reference, scored),
                  "tokens": tokens}
    print(f"  {name:10s} ppl {ppl:8.4f}  delta {100 * (ppl / base - 1):+.3f}%  "
          f"KL {1000 * rows[name]['kl']:6.2f} mnats/token  ({seconds:.0f}s)", flush=True)


Scored = list[tuple[torch.Tensor, torch.Tensor]]


def score_texts(parser: argparse.ArgumentParser, texts: dict[str, str], tokenizer: Tokenizer, tokens: int,
                configs: dict[str, Callable[[list[int]], Scored]]) -> dict[str, dict[str, dict[str, float]]]:
    """Each text's first `tokens` ids scored by every config (name → ids → window_log_probs), the first
    the baseline of the others: {text: {config: row}} (record_row), printed as it goes."""
    results: dict[str, dict[str, dict[str, float]]] = {}
    for text_name, text in texts.items():
        ids = tokenizer.encode(text)[:tokens]
        if len(ids) < 2:
            parser.error(f"--text-file {text_name}: fewer than 2 tokens")
        print(f"{text_name}: {len(ids)} tokens", flush=True)
        rows: dict[str, dict[str, float]] = {}
        reference = None
        for name, score in configs.items():
            t0 = time.monotonic()
            scored = score(ids)
            reference = reference or scored
            record_row(rows, name, scored, reference, len(ids), time.monotonic() - t0)
        results[text_name] = rows
    return results


def jitter_offsets(offsets: torch.Tensor, seed: int) -> torch.Tensor:
    """Float16-valued offsets, each moved to its float16 neighbour below or above, or left, at random."""
    gen = torch.Generator().manual_seed(seed)
    values = offsets.cpu().half().numpy()
    steps = torch.randint(-1, 2, values.shape, generator=gen).numpy()
    toward = np.where(steps > 0, np.float16(np.inf), np.float16(-np.inf))
    with np.errstate(over="ignore"):  # float16's largest value stays where it is
        neighbours = np.nextafter(values, toward)
    moved = np.where((steps == 0) | ~np.isfinite(neighbours), values, neighbours)
    return torch.from_numpy(moved.astype(np.float16)).float().to(offsets.device)


def perplexity(model, model_config, config: EngineConfig, ids: list[int],
               key_offsets: torch.Tensor | None = None) -> float:
    """exp(mean NLL) of `ids` (window_log_probs)."""
    return math.exp(mean_nll(window_log_probs(model, model_config, config, ids, key_offsets)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of each text (default 4096)")
    parser.add_argument("--text-file", action="append", type=Path, default=None,
                        help="score this text (repeatable; default: pydoc_data.topics)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--offset-jitter", type=int, default=0, metavar="N",
                        help="also N kv-int4 rows, key offsets jittered by a float16 step (module doc)")
    args = parser.parse_args()
    if args.offset_jitter < 0:
        parser.error(f"--offset-jitter {args.offset_jitter}: must be >= 0")
    texts = {str(f): read_text(parser, f) for f in args.text_file} if args.text_file else {
        "pydoc_data.topics": default_text()}
    path = resolve_model_path(None)
    model_config, model = load_model(path, "float32", "cpu")
    tokenizer = Tokenizer.from_model(path)
    # int4 rows run the model and offsets an int4 engine makes at start: keys balanced against the queries
    # and the balanced keys' offsets (engine/quantize/kv_balance.py); the other rows run the model as
    # loaded, as their engines do.
    balanced = copy.deepcopy(model)
    _, key_offsets = balance_keys(balanced, calibration_ids(None, model_config.vocab_size))
    def scorer(config: EngineConfig) -> Callable[[list[int]], Scored]:
        int4 = config.resolved_kv_cache_dtype == "int4"
        return lambda ids: window_log_probs(balanced if int4 else model, model_config, config, ids,
                                            key_offsets if int4 else None)

    configs = {name: scorer(EngineConfig(num_kv_blocks=-(-CONTEXT // 16), **overrides))
               for name, overrides in kv_cache_configs().items()}
    int4 = EngineConfig(num_kv_blocks=-(-CONTEXT // 16), kv_cache_dtype="int4")
    for seed in range(args.offset_jitter):
        jittered = jitter_offsets(key_offsets, seed)
        configs[f"jitter-{seed}"] = (
            lambda ids, o=jittered: window_log_probs(balanced, model_config, int4, ids, o))
    results = score_texts(parser, texts, tokenizer, args.tokens, configs)
    for text_name, rows in results.items():
        jitter = [row for name, row in rows.items() if name.startswith("jitter-")]
        if jitter:
            deltas, kls = [100 * r["rel_delta"] for r in jitter], [1000 * r["kl"] for r in jitter]
            print(f"{text_name}: kv-int4 with jittered offsets over {len(jitter)} seeds: delta "
                  f"{min(deltas):+.3f} .. {max(deltas):+.3f}%, "
                  f"KL {min(kls):.2f} .. {max(kls):.2f} mnats/token")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"texts": results}, f, indent=2)


if __name__ == "__main__":
    main()
