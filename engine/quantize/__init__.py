"""Weight schemes as transforms of a built model, picked by EngineConfig.weights (apply_weights_scheme).

The model stays plain: a scheme swaps the layers' projection modules (engine/quantize/projections.py) for
quantized ones, which LlamaModel calls through its module path. Those are not float linears, so the CPU fp32
linears (engine/cpu_linear.py) skip them (a float LM head still gets one); CPU decode (1..32 sequences) runs
them through FlatDecoder, which calls each quantized module as it is. On CPU the schemes keep their own
modules: w4a16 serves Q4_1 blocks through kernels/cpu_quant's AVX2 kernels with fp32 activations
(engine/quantize/cpu_linears.py), and the GGUF's Q8_0 LM head too where the file has one; w8 serves its per-
channel int8 through the same Q8_0 product; w8a8 multiplies int8 values in FBGEMM's fp16-weight GEMM.
Elsewhere (and for w8 where the CPU module cannot take the weights) the projections are
engine/quantize/kernel_linears.py's, whose products are the kernel registry's quantized ops
(kernels/quant_linear on CUDA, graph-capturable).
"""
from __future__ import annotations

import logging
import random
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.model import LlamaModel
from engine.model_files import resolve_model_path
from engine.quantize.calibration import activation_absmax, calibration_text
from engine.quantize.cpu_linears import Q41Linear, Q80Linear
from engine.quantize.gguf_q4_1 import read_q4_1_projections
from engine.quantize.gguf_q8_0 import read_q8_0_head
from engine.quantize.int4 import quantize_int4
from engine.quantize.kernel_linears import W4A16KernelLinear, W8A8KernelLinear, W8KernelLinear
from engine.quantize.projections import projections
from engine.quantize.w8a8 import (
    ROTATION_BLOCK,
    SMOOTHING_ALPHA,
    W8A8Linear,
    quantize_per_channel,
    rotated_weight,
    smoothing_factors,
)
from engine.random_models import is_random_model
from kernels.cpu_quant.layout import QK, pack_q4_1, q8_0_of
from kernels.cpu_quant.library import library
from kernels.quant_linear.layout import W8Weight, pack_w4

logger = logging.getLogger(__name__)

FLOAT_INT4_GROUP_SIZE = 32  # int4 from float weights: GGUF's block size (128 is coarser; tests cover both)
# On CUDA the Triton kernels read 4.25 bits a weight at g = 128 (4.5 at 32) and decode is bandwidth-bound:
# the largest of these that divides a projection's in_features (Llama-3-8B: 128 everywhere).
KERNEL_INT4_GROUP_SIZES = (128, 64, 32)


class UnsupportedWeightsError(ValueError):
    """The weights scheme cannot run on this device or model."""


def apply_weights_scheme(model: LlamaModel, config: EngineConfig) -> None:
    """Quantize `model`'s projections in place as config.weights asks ("auto" and "bf16" leave it as loaded:
    EngineConfig already made the compute dtype bfloat16 for "bf16")."""
    if config.weights in ("auto", "bf16"):
        return
    device = model.embed_tokens.weight.device
    source = None if is_random_model(config.model_path) else resolve_model_path(config.model_path)
    on_cpu = device.type == "cpu"
    if config.weights == "w4a16":
        how = use_int4(model, source) if on_cpu else use_int4_kernels(model, source)
    elif config.weights == "w8":
        how = use_w8(model, on_cpu, source)
    else:
        how = use_w8a8(model, source, kernel_modules=not on_cpu)
    logger.info("weights %s: %s", config.weights, how)


def use_int4(model: LlamaModel, source: Path | None) -> str:
    """W4A16 on CPU (kernels/cpu_quant, fp32 activations): the GGUF's Q4_1 blocks as they are when every
    projection is Q4_1, else int4 groups of 32 from the loaded float weights; and the GGUF's Q8_0 LM head
    blocks when it has them (the tied embedding keeps its float rows for lookups). Raises
    CompilerMissingError, naming gcc, when the kernels cannot be built. Returns how, for the log."""
    library()  # built (or found in the cache) now: a missing compiler fails the load, not the first step
    native = None
    if source is not None and source.suffix.lower() == ".gguf":
        native = read_q4_1_projections(source, model.config)
    for slot in projections(model):
        if native is not None:
            q, d, m = native[slot.layer, slot.name]
        else:
            q, d, m = quantize_int4(slot.module.weight.detach(), FLOAT_INT4_GROUP_SIZE)
        slot.replace(Q41Linear(pack_q4_1(q, d, m), slot.silu_mul_input))
    how = (f"GGUF Q4_1 blocks of {source.name} served natively" if native is not None
           else f"int4 groups of {FLOAT_INT4_GROUP_SIZE} from float weights")
    return how + use_native_head(model, source) + " (kernels/cpu_quant, fp32 activations)"


def use_native_head(model: LlamaModel, source: Path | None) -> str:
    """The GGUF's Q8_0 LM head blocks as the head (Q80Linear: the same values as the float head, 4x fewer
    bytes a token), when the file has them; the embedding keeps its float rows. Returns how, for the log."""
    if source is None or source.suffix.lower() != ".gguf":
        return ""
    head = read_q8_0_head(source, model.config)
    if head is None:
        return ""
    model.lm_head = Q80Linear(head)
    return ", the GGUF's Q8_0 LM head"


def kernel_group_size(in_features: int) -> int:
    """The int4 group size the kernel path quantizes float weights with (KERNEL_INT4_GROUP_SIZES)."""
    for group in KERNEL_INT4_GROUP_SIZES:
        if in_features % group == 0:
            return group
    raise UnsupportedWeightsError(f"int4 groups of {KERNEL_INT4_GROUP_SIZES} do not divide in_features "
                                  f"{in_features}")


def use_int4_kernels(model: LlamaModel, source: Path | None) -> str:
    """W4A16 for the kernel registry (CUDA): the GGUF's Q4_1 blocks repacked once into the kernels' layout
    (their float16 d and m carry over exactly), else group-wise int4 from the loaded float weights."""
    native = None
    if source is not None and source.suffix.lower() == ".gguf":
        native = read_q4_1_projections(source, model.config)
    groups = set()
    for slot in projections(model):
        weight = slot.module.weight.detach()
        if native is not None:
            q, d, m = (t.to(weight.device) for t in native[slot.layer, slot.name])
        else:
            q, d, m = quantize_int4(weight, kernel_group_size(weight.shape[1]))
        packed = pack_w4(q, d, m)
        groups.add(packed.group_size)
        slot.replace(W4A16KernelLinear(packed, slot.silu_mul_input))
    how = (f"GGUF Q4_1 blocks of {source.name} repacked" if native is not None
           else f"int4 groups of {sorted(groups)} from float weights")
    return f"{how} (Triton W4A16 kernels through the registry, 16-bit activations)"


def use_w8(model: LlamaModel, on_cpu: bool = False, source: Path | None = None) -> str:
    """Weight-only int8: symmetric per-output-channel int8 weights, activations in the compute dtype. On CPU
    with fp32 weights whose in_features are multiples of 32, kernels/cpu_quant's Q8_0 product serves them (the
    channel's scale in each block of 32: the same weights), with the GGUF's Q8_0 LM head where `source` has
    one (use_native_head), else the registry's w8_linear."""
    slots = projections(model)
    cpu_kernel = on_cpu and all(s.module.weight.dtype == torch.float32 and s.module.weight.shape[1] % QK == 0
                                for s in slots)
    if cpu_kernel:
        library()  # a missing compiler fails the load, naming gcc
    for slot in slots:
        q, scale = quantize_per_channel(slot.module.weight.detach())
        if cpu_kernel:
            blocks = scale.unsqueeze(1).expand(-1, q.shape[1] // QK)
            slot.replace(Q80Linear(q8_0_of(q, blocks), slot.silu_mul_input))
        else:
            slot.replace(W8KernelLinear(W8Weight(q, scale), slot.silu_mul_input))
    if cpu_kernel:
        head = use_native_head(model, source)
        return f"int8 per output channel{head}, fp32 activations (kernels/cpu_quant's Q8_0 product)"
    if on_cpu:
        logger.info("w8 on CPU: not every projection is fp32 with in_features a multiple of %d; the "
                    "registry's reference w8_linear serves them", QK)
    return "int8 per output channel, activations in the compute dtype (registry's w8_linear)"


def use_w8a8(model: LlamaModel, source: Path | None, kernel_modules: bool = False) -> str:
    """W8A8 with SmoothQuant factors calibrated on stdlib docstrings (engine/quantize/calibration.py);
    `kernel_modules`: the registry's w8a8_linear serves them (CUDA), else the CPU module."""
    if source is not None:
        from engine.tokenizer import Tokenizer

        tokens, text = Tokenizer.from_model(source).encode(calibration_text()), "stdlib docstrings"
    else:  # a random-weight model has no tokenizer (and no text it was trained on)
        rng = random.Random(0)
        tokens = [rng.randrange(model.config.vocab_size) for _ in range(2048)]
        text = "seeded random token ids (random-weight model)"
    for slot, absmax in activation_absmax(model, tokens):
        weight = slot.module.weight.detach()
        smooth = smoothing_factors(absmax, weight)
        if kernel_modules:
            rotated, block = rotated_weight(weight, smooth)
            weight_int8 = W8Weight(*quantize_per_channel(rotated))
            slot.replace(W8A8KernelLinear(weight_int8, 1.0 / smooth.float(), block, slot.silu_mul_input))
        else:
            slot.replace(W8A8Linear(weight, smooth, slot.silu_mul_input))
    return (f"int8 per channel, int8 per token, SmoothQuant alpha {SMOOTHING_ALPHA} calibrated on {text}, "
            f"inputs rotated by Hadamard blocks of up to {ROTATION_BLOCK}")
