"""Calibrated int4 key offsets: the mean post-rotary key per (layer, KV head) on text the eval never uses: the
ids every worker of a model calibrates on, and the offsets' rounding."""
from __future__ import annotations

import random

import torch

from engine.model_files import resolve_model_path
from engine.quantize.calibration import calibration_text
from engine.random_models import is_random_model
from engine.tokenizer import Tokenizer

# 4 windows of CALIBRATION_CONTEXT (positions 0..511 each), the calibration docs/benchmarks.md measured.
KEY_OFFSET_TOKENS = 2048


def calibration_ids(model_path: str | None, vocab_size: int) -> list[int]:
    """KEY_OFFSET_TOKENS ids of engine/quantize/calibration.py's stdlib docstrings, or seeded random ids for a
    random-weight model (no tokenizer): the same ids on every worker of the same model."""
    if is_random_model(model_path):
        rng = random.Random(0)
        return [rng.randrange(vocab_size) for _ in range(KEY_OFFSET_TOKENS)]
    ids = Tokenizer.from_model(resolve_model_path(model_path)).encode(calibration_text())[:KEY_OFFSET_TOKENS]
    if max(ids) >= vocab_size:
        raise ValueError(f"the tokenizer of model_path {model_path!r} gives ids past the model's vocab "
                         f"{vocab_size}: key offsets are calibrated on the tokenizer's own model")
    return ids


def key_offsets(mean_keys: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The mean post-rotary key [num_layers, num_kv_heads, head_dim] (measured over calibration_ids by
    kv_balance.key_statistics) rounded to float16 values — every worker rounds its float64 sums the same way
    — as contiguous float32 on `device`. int4 stores subtract it from every key: softmax ignores the shift,
    and the centred keys quantize with less error (docs/benchmarks.md, "KV cache quantization")."""
    return mean_keys.half().float().contiguous().to(device)
