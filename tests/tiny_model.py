"""Tiny random Llama models for CPU path tests: every parameter, norm gains too, drawn from N(0, std²)."""
from __future__ import annotations

import torch

from engine.config import EngineConfig, ModelConfig
from engine.llm_engine import LLMEngine
from engine.model import LlamaModel
from engine.random_models import PRESETS, build_random_model


def normal_model(config: ModelConfig, std: float = 0.3, seed: int = 0) -> LlamaModel:
    """A LlamaModel of `config` on CPU, torch's global seed set to `seed` first (as the tests always did)."""
    torch.manual_seed(seed)
    model = LlamaModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    model.init_buffers("cpu")
    return model


def tiny_preset_engine() -> LLMEngine:
    """An fp32 CPU engine (32 KV blocks, 4 sequences) over the "tiny" random preset, weights of seed 0."""
    preset = PRESETS["tiny"]
    model = build_random_model(preset, torch.float32, "cpu", seed=0)
    return LLMEngine(EngineConfig(device="cpu", dtype="float32", num_kv_blocks=32, max_num_seqs=4),
                     model=(preset, model))
