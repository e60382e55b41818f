"""Perplexity of the embedded model per KV cache dtype (fp32 KV baseline vs int8 / int4), sliding windows."""
from __future__ import annotations

import argparse
import json
import math
import time

import torch

from engine.config import EngineConfig
from engine.kv_cache import KVCache
from engine.model_files import load_model, resolve_model_path
from engine.quantize.kv_balance import balance_keys
from engine.quantize.kv_offsets import calibrate_key_offsets, calibration_ids
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


@torch.inference_mode()
def perplexity(model, model_config, config: EngineConfig, ids: list[int],
               key_offsets: torch.Tensor | None = None) -> float:
    """exp(mean NLL) of `ids` under `model` with a KV cache built from `config` (ctx CONTEXT, STRIDE) and
    the int4 key offsets given."""
    blocks = -(-CONTEXT // config.block_size)
    kv = KVCache.for_model(model_config, config, key_offsets)
    nll, scored = 0.0, 0
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
        logits = model.compute_logits(hidden[first:])
        nll += torch.nn.functional.cross_entropy(logits, targets[first:], reduction="sum").item()
        scored += n - first
        if start + CONTEXT + 1 >= len(ids):
            break
    return math.exp(nll / scored)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    path = resolve_model_path(None)
    model_config, model = load_model(path, "float32", "cpu")
    ids = Tokenizer.from_model(path).encode(default_text())[: args.tokens]
    # int4 rows run the model and offsets the engine makes at start: keys balanced against the queries
    # (engine/quantize/kv_balance.py), then the offsets of the balanced keys (engine/quantize/kv_offsets.py).
    # The balance leaves every product the same (a float cache's rows move by rounding only).
    ids_calibration = calibration_ids(None, model_config.vocab_size)
    balance_keys(model, ids_calibration)
    key_offsets = calibrate_key_offsets(model, ids_calibration)
    results: dict[str, dict[str, float]] = {}
    for name, overrides in kv_cache_configs().items():
        config = EngineConfig(num_kv_blocks=-(-CONTEXT // 16), **overrides)
        t0 = time.monotonic()
        offsets = key_offsets if config.resolved_kv_cache_dtype == "int4" else None
        ppl = perplexity(model, model_config, config, ids, offsets)
        base = results.get("baseline", {}).get("ppl", ppl)
        results[name] = {"ppl": ppl, "rel_delta": ppl / base - 1.0}
        seconds = time.monotonic() - t0
        print(f"{name:10s} ppl {ppl:8.4f}  delta {100 * (ppl / base - 1):+.3f}%  ({seconds:.0f}s)",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tokens": len(ids), "configs": results}, f, indent=2)


if __name__ == "__main__":
    main()
