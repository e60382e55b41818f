"""Weight schemes as transforms of a built model, picked by EngineConfig.weights (apply_weights_scheme).

The model stays plain: a scheme swaps the layers' projection modules (engine/quantize/projections.py) for
quantized ones, which LlamaModel calls through its module path. Those are not float linears, so the CPU
column-block layout skips them (it still blocks the float LM head); CPU bs1 decode runs them through
FlatDecoder, which calls each quantized module as it is.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path

from engine.config import EngineConfig
from engine.model import LlamaModel
from engine.model_files import resolve_model_path
from engine.quantize.calibration import activation_absmax, calibration_text
from engine.quantize.gguf_q4_1 import read_q4_1_projections
from engine.quantize.int4 import Int4Linear, quantize_int4
from engine.quantize.projections import projections
from engine.quantize.w8a8 import W8A8Linear, smoothing_factors
from engine.random_models import is_random_model

logger = logging.getLogger(__name__)

FLOAT_INT4_GROUP_SIZE = 32  # int4 from float weights: GGUF's block size (128 is coarser; tests cover both)


class UnsupportedWeightsError(ValueError):
    """The weights scheme cannot run on this device or model."""


def apply_weights_scheme(model: LlamaModel, config: EngineConfig) -> None:
    """Quantize `model`'s projections in place as config.weights asks ("auto" and "bf16" leave it as loaded:
    EngineConfig already made the compute dtype bfloat16 for "bf16")."""
    if config.weights in ("auto", "bf16"):
        return
    device = model.embed_tokens.weight.device
    source = None if is_random_model(config.model_path) else resolve_model_path(config.model_path)
    if config.weights == "w4a16":
        if device.type != "cpu":
            raise UnsupportedWeightsError(f"weights 'w4a16' runs on CPU only so far, not on {device}")
        how = use_int4(model, source)
    else:
        how = use_w8a8(model, source)
    logger.info("weights %s: %s", config.weights, how)


def use_int4(model: LlamaModel, source: Path | None) -> str:
    """W4A16: the GGUF's Q4_1 blocks as they are when every projection is Q4_1, else group-wise int4 from the
    loaded float weights. Returns how, for the log."""
    native = None
    if source is not None and source.suffix.lower() == ".gguf":
        native = read_q4_1_projections(source, model.config)
    for slot in projections(model):
        if native is not None:
            q, d, m = native[slot.layer, slot.name]
        else:
            q, d, m = quantize_int4(slot.module.weight.detach(), FLOAT_INT4_GROUP_SIZE)
        slot.replace(Int4Linear(q, d, m, slot.silu_mul_input))
    if native is not None:
        return f"GGUF Q4_1 blocks of {source.name} served natively (torch int4 kernel, bf16 activations)"
    return f"int4 groups of {FLOAT_INT4_GROUP_SIZE} from float weights (torch int4 kernel, bf16 activations)"


def use_w8a8(model: LlamaModel, source: Path | None) -> str:
    """W8A8 with SmoothQuant factors calibrated on stdlib docstrings (engine/quantize/calibration.py)."""
    if source is not None:
        from engine.tokenizer import Tokenizer

        tokens, text = Tokenizer.from_model(source).encode(calibration_text()), "stdlib docstrings"
    else:  # a random-weight model has no tokenizer (and no text it was trained on)
        rng = random.Random(0)
        tokens = [rng.randrange(model.config.vocab_size) for _ in range(2048)]
        text = "seeded random token ids (random-weight model)"
    for slot, absmax in activation_absmax(model, tokens):
        weight = slot.module.weight.detach()
        slot.replace(W8A8Linear(weight, smoothing_factors(absmax, weight), slot.silu_mul_input))
    return f"int8 per channel, int8 per token, SmoothQuant alpha 0.5 calibrated on {text}"
