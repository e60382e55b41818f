"""KVLayout: the KV cache's wire format, exchanged at handshake; mismatches fail loudly on both sides."""

from __future__ import annotations

import dataclasses
import enum
import json
from typing import Any, Protocol

from contracts.kv_cache_spec import KVCacheSpec, KVScales

# 2: the layout carries the cache's KVCacheSpec (logical dtype, scales) instead of a torch dtype name.
_WIRE_VERSION = 2


class KVLayoutMismatch(ValueError):
    """Two KV layouts differ; the message names every differing field with both values."""

    def __init__(self, message: str, fields: tuple[tuple[str, object, object], ...] = ()) -> None:
        super().__init__(message)
        self.fields = fields


class CacheTensor(Protocol):
    """What `check_cache` reads of a cache tensor (a torch.Tensor), so this module needs no torch."""

    @property
    def shape(self) -> Any: ...

    @property
    def dtype(self) -> Any: ...


@dataclasses.dataclass(frozen=True)
class KVLayout:
    """One worker's KV cache on the wire, built from its spec, layer count and TP shard: per layer, k and v
    are `[num_blocks, *spec.storage_block_shape]` of `spec.storage_dtype`, then each of `scale_names()`
    (`[num_blocks, *shape]` of `spec.scales.dtype`), all sent as stored: a quantized cache's bytes and scales
    land on the decode side unchanged, never re-quantized."""

    spec: KVCacheSpec
    num_layers: int
    tp_rank: int = 0
    tp_size: int = 1

    def __post_init__(self) -> None:
        for name in ("num_layers", "tp_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"KVLayout.{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.tp_rank, int) or not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"KVLayout.tp_rank must be in [0, {self.tp_size}), got {self.tp_rank!r}")

    @property
    def dtype(self) -> str:
        """The cache's logical dtype ("bfloat16", ...; "int4" for a packed uint8 cache)."""
        return self.spec.dtype

    @property
    def block_size(self) -> int:
        return self.spec.block_size

    @property
    def block_shape(self) -> tuple[int, int, int]:
        """One block of one layer's k (or v) as stored."""
        return self.spec.storage_block_shape

    def block_bytes(self) -> int:
        """Bytes of one block of k (or v) for one layer."""
        return self.spec.value_bytes_per_block

    def scale_names(self) -> tuple[str, ...]:
        """The scale tensors a layer frame carries after k and v, in order (none for float caches)."""
        return tuple(self.spec.scale_shapes())

    def bytes_per_token(self) -> int:
        """Bytes one token of one layer puts on the wire: k, v and their scales (frame padding aside)."""
        return self.spec.bytes_per_token

    def wire_ratio_vs_bf16(self) -> float:
        """bytes_per_token over a bf16 cache's of the same heads and head_dim."""
        bf16 = KVCacheSpec(self.spec.block_size, self.spec.num_kv_heads, self.spec.head_dim, "bfloat16")
        return self.spec.bytes_per_token / bf16.bytes_per_token

    def check_scales(self, scales: tuple[CacheTensor, ...], what: str = "scales") -> None:
        """Raise ValueError unless `scales` are `scale_names()`'s tensors: `[num_blocks, *shape]`, scale
        dtype, in order."""
        shapes = self.spec.scale_shapes()
        got = [(tuple(t.shape)[1:], str(t.dtype).removeprefix("torch.")) for t in scales]
        want = [(shape, self.spec.scales.dtype) for shape in shapes.values()]
        if got != want:
            raise ValueError(f"{what} {got} do not match the layout's {list(shapes)} {want}")

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` tokens (what the sender ships for a prompt of that length)."""
        return self.spec.num_blocks_for(num_tokens)

    def flat_fields(self) -> dict[str, object]:
        """Every field, the spec's included (`dtype`, `scales.kind`, ...), in declaration order."""
        return _flatten(self)

    def diff(self, other: KVLayout) -> tuple[tuple[str, object, object], ...]:
        """(field, self's value, other's value) for every field that differs."""
        mine, theirs = self.flat_fields(), other.flat_fields()
        return tuple((name, mine[name], theirs[name]) for name in mine if mine[name] != theirs[name])

    def check_compatible(self, other: KVLayout, names: tuple[str, str] = ("this", "peer")) -> None:
        """Raise KVLayoutMismatch naming each differing field, unless the two layouts are byte-compatible."""
        # Bytes move as stored (no conversion on the receiving side), so every field must match exactly.
        diffs = self.diff(other)
        if diffs:
            parts = [f"{name} {names[0]}={a!r} {names[1]}={b!r}" for name, a, b in diffs]
            raise KVLayoutMismatch("KV layout mismatch: " + "; ".join(parts), diffs)

    def to_bytes(self) -> bytes:
        doc = {"version": _WIRE_VERSION, "layout": dataclasses.asdict(self)}
        return json.dumps(doc, sort_keys=True).encode()

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
            spec = dict(body.pop("spec"))
            spec["scales"] = KVScales(**spec["scales"])
            return cls(spec=KVCacheSpec(**spec), **body)
        except (TypeError, KeyError, AttributeError) as e:
            raise ValueError(f"KVLayout fields do not match this version: {body!r}") from e

    def check_cache(self, cache: CacheTensor, what: str = "cache") -> None:
        """Raise ValueError unless `cache` is a `[num_blocks, *block_shape]` tensor of the storage dtype."""
        dtype = str(cache.dtype).removeprefix("torch.")
        shape = tuple(cache.shape)
        if len(shape) != 4 or shape[1:] != self.block_shape or dtype != self.spec.storage_dtype:
            raise ValueError(
                f"{what} of shape {shape} and dtype {dtype} does not match the "
                f"layout [num_blocks, {', '.join(map(str, self.block_shape))}] {self.spec.storage_dtype}"
            )


def _flatten(obj: object, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        # The spec's own fields read as the layout's ("dtype", not "spec.dtype"); deeper ones keep a prefix.
        name = "" if f.name == "spec" else f"{prefix}{f.name}."
        if dataclasses.is_dataclass(value):
            out |= _flatten(value, name)
        else:  # enums read as their wire value in mismatch messages
            out[f"{prefix}{f.name}"] = value.value if isinstance(value, enum.Enum) else value
    return out
