"""Paged KV cache built from its KVCacheSpec: per layer `k`/`v` block pools in the wire format."""
from __future__ import annotations

import dataclasses
import hashlib

import torch

from contracts.kv_cache_spec import KVCacheSpec, scales_for
from engine.config import EngineConfig, ModelConfig
from kernels.store_kv.quant import QuantizedKV

# The spec names dtypes without torch; this is where the names become torch dtypes.
_TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
    "uint8": torch.uint8,
}


def key_offset_digest(offsets: torch.Tensor) -> str:
    """KVCacheSpec.key_offset_digest of key offsets: a short hash of their float16 values."""
    return hashlib.sha256(offsets.detach().half().cpu().numpy().tobytes()).hexdigest()[:16]


def dtype_name(dtype: torch.dtype) -> str:
    """The spec's name for a torch dtype ('bfloat16' for torch.bfloat16)."""
    for name, candidate in _TORCH_DTYPES.items():
        if candidate == dtype:
            return name
    raise ValueError(f"{dtype} is not a KV cache storage dtype (one of {list(_TORCH_DTYPES)})")


class KVCache:
    """Per-layer K and V block pools shaped by `spec`; kv_transfer ships `k[layer][block_ids]` and `v[...]` as
    stored. A quantized spec adds per-layer scale tensors (`scales[name][layer]`, names from
    `spec.scale_shapes()`); float caches have none. `key_offsets` [num_layers, num_kv_heads, head_dim]
    (int4 only; spec.key_offset_digest names them): what every store subtracts from the keys of each layer."""

    def __init__(self, spec: KVCacheSpec, num_layers: int, num_blocks: int,
                 device: torch.device | str = "cpu", key_offsets: torch.Tensor | None = None) -> None:
        for name, value in (("num_layers", num_layers), ("num_blocks", num_blocks)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        digest = "" if key_offsets is None else key_offset_digest(key_offsets)
        if digest != spec.key_offset_digest:
            raise ValueError(f"key offsets (digest {digest!r}) do not match the spec's "
                             f"{spec.key_offset_digest!r}")
        self.spec = spec
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.dtype = _TORCH_DTYPES[spec.storage_dtype]
        self.device = torch.device(device)
        shape = (num_blocks, *spec.storage_block_shape)
        # Zeroed, not empty: whole blocks are shipped and checksummed, so unwritten tail slots must be
        # deterministic.
        self.k: list[torch.Tensor] = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                                      for _ in range(num_layers)]
        self.v: list[torch.Tensor] = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                                      for _ in range(num_layers)]
        scale_dtype = _TORCH_DTYPES[spec.scales.dtype]
        self.scales: dict[str, list[torch.Tensor]] = {
            name: [torch.zeros((num_blocks, *block), dtype=scale_dtype, device=self.device)
                   for _ in range(num_layers)]
            for name, block in spec.scale_shapes().items()
        }
        if key_offsets is not None and tuple(key_offsets.shape) != (num_layers, *spec.block_shape[1:]):
            raise ValueError(f"key offsets must be [{num_layers}, {spec.num_kv_heads}, {spec.head_dim}], got "
                             f"{list(key_offsets.shape)}")
        self.key_offsets = (None if key_offsets is None
                            else key_offsets.to(self.device, torch.float32).contiguous())
        self._layers = [(self._operand("k", i), self._operand("v", i)) for i in range(num_layers)]

    @classmethod
    def for_model(cls, model: ModelConfig, engine: EngineConfig,
                  key_offsets: torch.Tensor | None = None) -> KVCache:
        """The cache `engine` asks for: its block count and size, kv_cache_dtype ("auto" = compute dtype),
        and the int4 key offsets given."""
        dtype = engine.resolved_kv_cache_dtype
        spec = KVCacheSpec(engine.block_size, model.num_kv_heads, model.head_dim, dtype,
                           scales_for(dtype, model.head_dim))
        return cls(with_key_offsets(spec, key_offsets), model.num_layers, engine.num_kv_blocks, engine.device,
                   key_offsets)

    @property
    def block_size(self) -> int:
        return self.spec.block_size

    @property
    def num_kv_heads(self) -> int:
        return self.spec.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.spec.head_dim

    @property
    def bytes_per_block(self) -> int:
        """K + V bytes (scales included) of one block across all layers."""
        return self.num_layers * self.spec.bytes_per_block

    @property
    def num_bytes(self) -> int:
        return self.bytes_per_block * self.num_blocks

    def layer(self, index: int) -> tuple[torch.Tensor | QuantizedKV, torch.Tensor | QuantizedKV]:
        """Layer `index`'s k and v as the kernels take them: tensors, or QuantizedKV with their scales."""
        return self._layers[index]

    def _operand(self, name: str, index: int) -> torch.Tensor | QuantizedKV:
        codes = (self.k if name == "k" else self.v)[index]
        if not self.spec.is_quantized:
            return codes
        zero, scales = self.scales.get(f"{name}_zero"), self.spec.scales
        offset = self.key_offsets[index] if name == "k" and self.key_offsets is not None else None
        return QuantizedKV(codes, self.scales[f"{name}_scale"][index], None if zero is None else zero[index],
                           scales.group_size if name == "k" else scales.value_group_size, scales.hadamard,
                           offset)

    def layer_scales(self, index: int) -> tuple[torch.Tensor, ...]:
        """Layer `index`'s scale tensors in `spec.scale_shapes()` order: what travels beside its k and v."""
        return tuple(self.scales[name][index] for name in self.spec.scale_shapes())

    def __repr__(self) -> str:
        return (f"KVCache(layers={self.num_layers}, blocks={self.num_blocks}, block_size={self.block_size}, "
                f"kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, dtype={self.spec.dtype}, "
                f"device={self.device})")


def with_key_offsets(spec: KVCacheSpec, key_offsets: torch.Tensor | None) -> KVCacheSpec:
    """`spec` naming `key_offsets` (their digest), or unchanged without offsets."""
    if key_offsets is None:
        return spec
    return dataclasses.replace(spec, key_offset_digest=key_offset_digest(key_offsets))
