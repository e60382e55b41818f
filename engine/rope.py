"""Rotary position embedding tables (plain and llama3-scaled), computed like HF transformers computes them."""
from __future__ import annotations

import math

import torch
from torch import nn

from engine.config import ModelConfig, RopeScaling


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in float32 (llama3 scaling applied when given)."""
    # Same expression as HF's default rope init, so the tables match bit for bit.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated smoothly.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables [max_positions, head_dim // 2]; `forward(positions)` gathers the rows a batch needs."""

    def __init__(self, config: ModelConfig, max_positions: int | None = None) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.theta = config.rope_theta
        self.scaling = config.rope_scaling
        self.max_positions = max_positions or config.max_position_embeddings
        # GGUF llama3 checkpoints ship per-frequency divisors (rope_freqs) instead of scaling parameters.
        self.freq_factors: torch.Tensor | None = None
        cos, sin = self._tables(torch.float32)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(
        self, dtype: torch.dtype, device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling)
        if self.freq_factors is not None:
            inv_freq = inv_freq / self.freq_factors.float().cpu()
        t = torch.arange(self.max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq.to(t.device))
        return freqs.cos().to(dtype=dtype, device=device), freqs.sin().to(dtype=dtype, device=device)

    def init_tables(self, dtype: torch.dtype, device: torch.device) -> None:
        """(Re)compute the tables, e.g. after the module was built on the meta device."""
        # Build on CPU first: the meta device cannot compute values.
        with torch.device("cpu"):
            self.cos, self.sin = self._tables(dtype, device)

    def set_freq_factors(self, factors: torch.Tensor) -> None:
        if factors.numel() != self.head_dim // 2:
            raise ValueError(f"rope_freqs has {factors.numel()} entries, expected {self.head_dim // 2}")
        self.freq_factors = factors.detach().float().cpu()
        self.init_tables(self.cos.dtype, self.cos.device)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions], self.sin[positions]
