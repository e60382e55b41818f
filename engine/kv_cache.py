"""Paged KV cache: per layer `k`/`v` [num_blocks, block_size, num_kv_heads, head_dim] (the wire format)."""
from __future__ import annotations

import torch

from engine.config import EngineConfig, ModelConfig


class KVCache:
    """Per-layer K and V block pools; kv_transfer ships `k[layer][block_ids]` and `v[...]` as stored."""

    def __init__(
        self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
        dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
    ) -> None:
        sizes = {"num_layers": num_layers, "num_blocks": num_blocks, "block_size": block_size,
                 "num_kv_heads": num_kv_heads, "head_dim": head_dim}
        for name, value in sizes.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        # Zeroed, not empty: whole blocks are shipped and checksummed, so unwritten tail slots must be
        # deterministic.
        self.k: list[torch.Tensor] = [torch.zeros(shape, dtype=dtype, device=self.device)
                                      for _ in range(num_layers)]
        self.v: list[torch.Tensor] = [torch.zeros(shape, dtype=dtype, device=self.device)
                                      for _ in range(num_layers)]

    @classmethod
    def for_model(cls, model: ModelConfig, engine: EngineConfig, dtype: torch.dtype) -> KVCache:
        return cls(model.num_layers, engine.num_kv_blocks, engine.block_size, model.num_kv_heads,
                   model.head_dim, dtype, engine.device)

    @property
    def block_shape(self) -> tuple[int, int, int]:
        return (self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def bytes_per_block(self) -> int:
        """K + V bytes of one block across all layers."""
        elems = self.block_size * self.num_kv_heads * self.head_dim
        return 2 * self.num_layers * elems * torch.empty((), dtype=self.dtype).element_size()

    @property
    def num_bytes(self) -> int:
        return self.bytes_per_block * self.num_blocks

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[index], self.v[index]

    def __repr__(self) -> str:
        return (f"KVCache(layers={self.num_layers}, blocks={self.num_blocks}, block_size={self.block_size}, "
                f"kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, dtype={self.dtype}, "
                f"device={self.device})")
