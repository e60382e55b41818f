"""Perplexity and KL divergence of the embedded model per weight scheme (fp32 baseline vs w8a8, w4a16, w8),
fp32 KV cache, sliding windows, on one or more texts: the weights' side of bench/quality/kv_cache_ppl.py.

    .venv/bin/python -m bench.quality.weights_ppl [--weights w8a8,...] [--tokens N] [--text-file PATH ...]
        [--json OUT]

Each scheme is the CPU engine's transform (engine/quantize.apply_weights_scheme) of a copy of the fp32
model. KL(fp32 ‖ scheme) of the next-token distributions reads weight changes perplexity alone can hide: a
scheme's errors may lower perplexity on one text and raise it on the next.
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from bench.quality.kv_cache_ppl import CONTEXT, default_text, read_text, score_texts, window_log_probs
from engine.config import WEIGHT_SCHEMES, EngineConfig
from engine.model_files import load_model, resolve_model_path
from engine.quantize import apply_weights_scheme
from engine.tokenizer import Tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="w8a8", help="comma-separated schemes (default w8a8)")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of each text (default 4096)")
    parser.add_argument("--text-file", action="append", type=Path, default=None,
                        help="score this text (repeatable; default: pydoc_data.topics)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    schemes = [s for s in args.weights.split(",") if s]
    bad = [s for s in schemes if s not in WEIGHT_SCHEMES or s in ("auto", "bf16")]
    if bad or not schemes:
        parser.error(f"--weights {args.weights}: each must be one of w8, w8a8, w4a16")
    if args.tokens < 2:
        parser.error(f"--tokens {args.tokens}: at least 2")
    texts = {str(f): read_text(parser, f) for f in args.text_file} if args.text_file else {
        "pydoc_data.topics": default_text()}
    path = resolve_model_path(None)
    model_config, model = load_model(path, "float32", "cpu")
    tokenizer = Tokenizer.from_model(path)
    kv = EngineConfig(num_kv_blocks=-(-CONTEXT // 16), kv_cache_dtype="float32")
    models = {"baseline": model}
    for scheme in schemes:
        models[scheme] = copy.deepcopy(model)
        apply_weights_scheme(models[scheme], EngineConfig(weights=scheme))
    results = score_texts(parser, texts, tokenizer, args.tokens, {
        name: (lambda ids, m=scheme_model: window_log_probs(m, model_config, kv, ids))
        for name, scheme_model in models.items()})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"texts": results}, f, indent=2)


if __name__ == "__main__":
    main()
