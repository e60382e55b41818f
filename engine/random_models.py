"""Random-weight models of real shapes (`random:llama-3-8b`) for speed work where no checkpoint is at hand."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from engine.config import ModelConfig, RopeScaling

if TYPE_CHECKING:
    from engine.model import LlamaModel

RANDOM_PREFIX = "random:"

PRESETS: dict[str, ModelConfig] = {
    # Llama-3.1-8B's config (its llama3 RoPE scaling and 128k context): speed work runs 16k-token prompts.
    "llama-3-8b": ModelConfig(
        name="llama-3-8b (random weights)", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=131072,
        rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192),
        tie_word_embeddings=False, bos_token_id=128000, eos_token_ids=(128001, 128009)),
    "smollm2-135m": ModelConfig(
        name="smollm2-135m (random weights)", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,)),
    "tiny": ModelConfig(
        name="tiny (random weights)", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=1024, tie_word_embeddings=False,
        eos_token_ids=(0,)),
}


class UnknownPreset(ValueError):
    """`random:NAME` names no preset; the message lists the known ones."""


def is_random_model(path: object) -> bool:
    return isinstance(path, str) and path.startswith(RANDOM_PREFIX)


def preset_config(path: str) -> ModelConfig:
    name = path.removeprefix(RANDOM_PREFIX)
    if name not in PRESETS:
        raise UnknownPreset(f"unknown random model {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Fill every parameter in place on its own device (no host copy of a 16 GB model); norm gains are 1."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for param in model.parameters():
        if param.dim() == 1:  # Llama's only 1-D parameters are RMSNorm gains (no biases)
            param.fill_(1.0)
        else:
            param.normal_(0.0, std, generator=gen)


def build_random_model(config: ModelConfig, dtype: torch.dtype, device: torch.device | str,
                       seed: int = 0, std: float = 0.02) -> LlamaModel:
    """A ready (eval) LlamaModel with random weights drawn on `device`, never materialized in fp32 first."""
    from engine.model import LlamaModel  # lazy: engine.model_files imports this module

    with torch.device("meta"):
        model = LlamaModel(config)
    model = model.to(dtype).to_empty(device=device)  # cast on meta: no fp32 copy on the device
    model.init_buffers(device)
    randomize_(model, seed=seed, std=std)
    return model.eval()
