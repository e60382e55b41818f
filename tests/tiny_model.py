"""Tiny random Llama models for CPU path tests: every parameter, norm gains too, drawn from N(0, std²)."""
from __future__ import annotations

import torch

from engine.config import ModelConfig
from engine.model import LlamaModel


def normal_model(config: ModelConfig, std: float = 0.3, seed: int = 0) -> LlamaModel:
    """A LlamaModel of `config` on CPU, torch's global seed set to `seed` first (as the tests always did)."""
    torch.manual_seed(seed)
    model = LlamaModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    model.init_buffers("cpu")
    return model
