"""KVLayout: the KV cache's wire format, exchanged at handshake; mismatches fail loudly on both sides."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import astuple, dataclass, fields

import torch

# Bits per stored element. int4 is packed two per byte in a uint8 tensor (its storage dtype).
DTYPE_BITS: dict[str, int] = {"float32": 32, "float16": 16, "bfloat16": 16, "int8": 8, "int4": 4}
_STORAGE_DTYPE: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
    "int4": torch.uint8,
}
_WIRE_VERSION = 1


class KVLayoutMismatch(ValueError):
    """Two KV layouts differ; the message names every differing field with both values."""

    def __init__(self, message: str, fields: tuple[tuple[str, object, object], ...] = ()) -> None:
        super().__init__(message)
        self.fields = fields


@dataclass(frozen=True)
class KVLayout:
    """Per layer, k and v are `[num_blocks, block_size, num_kv_heads, head_dim]` tensors of `dtype`."""

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # torch dtype name ("float32", "bfloat16", ...) or "int4" (packed into uint8)
    tp_rank: int = 0
    tp_size: int = 1

    def __post_init__(self) -> None:
        for name in ("num_layers", "block_size", "num_kv_heads", "head_dim", "tp_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"KVLayout.{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.tp_rank, int) or not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"KVLayout.tp_rank must be in [0, {self.tp_size}), got {self.tp_rank!r}")
        if self.dtype not in DTYPE_BITS:
            raise ValueError(f"KVLayout.dtype must be one of {sorted(DTYPE_BITS)}, got {self.dtype!r}")
        if (self.block_size * self.num_kv_heads * self.head_dim * DTYPE_BITS[self.dtype]) % 8:
            raise ValueError(
                f"a {self.dtype} block of {self.block_shape} elements is not a whole number of bytes"
            )

    @property
    def block_shape(self) -> tuple[int, int, int]:
        return (self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def storage_dtype(self) -> torch.dtype:
        """The torch dtype the cache tensors hold (int4 is stored packed in uint8)."""
        return _STORAGE_DTYPE[self.dtype]

    def block_bytes(self) -> int:
        """Bytes of one block of k (or v) for one layer."""
        return self.block_size * self.num_kv_heads * self.head_dim * DTYPE_BITS[self.dtype] // 8

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` tokens (what the sender ships for a prompt of that length)."""
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        return -(-num_tokens // self.block_size)

    def diff(self, other: KVLayout) -> tuple[tuple[str, object, object], ...]:
        """(field, self's value, other's value) for every field that differs."""
        return tuple(
            (f.name, a, b)
            for f, a, b in zip(fields(self), astuple(self), astuple(other), strict=True)
            if a != b
        )

    def check_compatible(self, other: KVLayout, names: tuple[str, str] = ("this", "peer")) -> None:
        """Raise KVLayoutMismatch naming each differing field, unless the two layouts are byte-compatible."""
        # Bytes move as stored (no conversion on the receiving side), so every field must match exactly.
        diffs = self.diff(other)
        if diffs:
            parts = [f"{name} {names[0]}={a!r} {names[1]}={b!r}" for name, a, b in diffs]
            raise KVLayoutMismatch("KV layout mismatch: " + "; ".join(parts), diffs)

    def to_bytes(self) -> bytes:
        body = {f.name: getattr(self, f.name) for f in fields(self)}
        return json.dumps({"version": _WIRE_VERSION, "layout": body}, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, b: bytes) -> KVLayout:
        try:
            doc = json.loads(b.decode())
            version, body = doc["version"], doc["layout"]
        except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"not a serialized KVLayout: {b[:80]!r}") from e
        if version != _WIRE_VERSION:
            raise ValueError(
                f"KVLayout wire version {version} is not supported (this side speaks {_WIRE_VERSION})"
            )
        try:
            return cls(**body)
        except TypeError as e:
            raise ValueError(f"KVLayout fields do not match this version: {sorted(body)}") from e

    def check_cache(self, cache: torch.Tensor, what: str = "cache") -> None:
        """Raise ValueError unless `cache` is a `[num_blocks, *block_shape]` tensor of the storage dtype."""
        if (
            cache.dim() != 4
            or tuple(cache.shape[1:]) != self.block_shape
            or cache.dtype != self.storage_dtype
        ):
            raise ValueError(
                f"{what} of shape {tuple(cache.shape)} and dtype {cache.dtype} does not match the "
                f"layout [num_blocks, {', '.join(map(str, self.block_shape))}] {self.storage_dtype}"
            )


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32 (the layout's spelling of a torch dtype)."""
    return str(dtype).removeprefix("torch.")


def layout_of_cache(k_caches: Sequence[torch.Tensor], tp_rank: int = 0, tp_size: int = 1) -> KVLayout:
    """The layout of an engine's per-layer k caches (v has the same shape by construction)."""
    if not k_caches:
        raise ValueError("layout_of_cache needs at least one layer")
    first = k_caches[0]
    if first.dim() != 4:
        raise ValueError(
            f"KV cache tensors must be [num_blocks, block_size, kv_heads, head_dim], got {tuple(first.shape)}"
        )
    _, block_size, num_kv_heads, head_dim = first.shape
    layout = KVLayout(
        len(k_caches),
        int(block_size),
        int(num_kv_heads),
        int(head_dim),
        dtype_name(first.dtype),
        tp_rank,
        tp_size,
    )
    for i, cache in enumerate(k_caches):
        layout.check_cache(cache, f"k cache of layer {i}")
    return layout
