"""Calibrated int4 key offsets: the mean post-rotary key per (layer, KV head) on text the eval never uses."""
from __future__ import annotations

import random

import torch

from engine.model import LlamaModel
from engine.model_files import resolve_model_path
from engine.quantize.calibration import CALIBRATION_CONTEXT, calibration_text
from engine.random_models import is_random_model
from engine.sequence_forward import prefill_cache
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


@torch.inference_mode()
def calibrate_key_offsets(model: LlamaModel, token_ids: list[int]) -> torch.Tensor:
    """The mean key [num_layers, num_kv_heads, head_dim] over `token_ids` in windows of CALIBRATION_CONTEXT
    (float32 KV cache, sums in float64 on CPU), rounded to float16 values and returned as contiguous float32
    on the model's device. int4 stores subtract it from every key: softmax ignores the shift, and the
    centred keys quantize with less error (docs/benchmarks.md, "KV cache quantization")."""
    sums: torch.Tensor | None = None
    count = 0
    for start in range(0, len(token_ids), CALIBRATION_CONTEXT):
        window = token_ids[start:start + CALIBRATION_CONTEXT]
        _, kv = prefill_cache(model, window, "float32")
        keys = torch.stack([k.flatten(0, 1)[:len(window)] for k in kv.k])  # [L, T, Hk, D]
        window_sums = keys.cpu().double().sum(1)
        sums = window_sums if sums is None else sums + window_sums
        count += len(window)
    if sums is None:
        raise ValueError("key offset calibration needs at least one token")
    return (sums / count).half().float().contiguous().to(model.embed_tokens.weight.device)

