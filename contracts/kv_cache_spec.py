"""KVCacheSpec: what one KV cache block holds (logical dtype, storage, shape, scales), without torch."""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

# Logical dtype -> (storage dtype, values per storage element). int4 packs two values into each uint8.
KV_FORMATS: dict[str, tuple[str, int]] = {
    "float32": ("float32", 1),
    "float16": ("float16", 1),
    "bfloat16": ("bfloat16", 1),
    "int8": ("int8", 1),
    "int4": ("uint8", 2),
}
QUANTIZED_DTYPES = ("int8", "int4")
# int4's values per scale + zero along head_dim (capped at head_dim), keys and values. Keys carry the loss
# (docs/benchmarks.md, "KV cache quantization"): 32-value key groups, 64-value value groups, float16 scale and
# zero: 0.30x the bytes of bf16 per token (32 for both would be 0.31x, over the wire budget).
INT4_KEY_GROUP_SIZE = 32
INT4_VALUE_GROUP_SIZE = 64
STORAGE_ITEMSIZE: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1}
_SCALE_DTYPES = ("float32", "float16", "bfloat16")


class ScaleKind(enum.StrEnum):
    NONE = "none"  # float caches
    PER_TOKEN_HEAD = "per_token_head"  # one scale per (token, kv head): int8
    # One scale (and zero point) per group of `group_size` (keys) / `value_group_size` (values) consecutive
    # head_dim values of one token and kv head: int4. (Not KIVI's per-channel key groups along tokens: a
    # block's key scales would change as decode appends tokens, and at block_size 16 they cost more wire bytes
    # than the 0.30x budget.)
    GROUPED = "grouped"


@dataclass(frozen=True)
class KVScales:
    """Where a quantized cache keeps its scales; `kind=NONE` for float caches."""

    kind: ScaleKind = ScaleKind.NONE
    group_size: int = 0  # GROUPED only: key values per scale
    zero_points: bool = False  # asymmetric quantization: a zero point beside every scale
    dtype: str = "float32"  # storage dtype of scales and zero points
    value_group_size: int = 0  # GROUPED only: value values per scale; 0 = group_size
    # Rows are stored rotated by the normalized Hadamard matrix of head_dim (x @ H): it spreads outlier
    # channels over the row before quantizing; readers rotate back (H @ H = I), or rotate q and the output.
    hadamard: bool = False

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kind", ScaleKind(self.kind))  # accepts the wire's plain string
        except ValueError:
            raise ValueError(f"scales kind must be one of {[k.value for k in ScaleKind]}, "
                             f"got {self.kind!r}") from None
        if self.dtype not in _SCALE_DTYPES:
            raise ValueError(f"scales dtype must be one of {list(_SCALE_DTYPES)}, got {self.dtype!r}")
        if self.kind is ScaleKind.GROUPED:
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise ValueError(f"grouped scales need group_size >= 1, got {self.group_size!r}")
            if not isinstance(self.value_group_size, int) or self.value_group_size < 0:
                raise ValueError(f"value_group_size must be >= 0, got {self.value_group_size!r}")
            if not self.value_group_size:
                object.__setattr__(self, "value_group_size", self.group_size)
        elif self.group_size != 0 or self.value_group_size != 0:
            raise ValueError(f"group_size is for grouped scales only, got {self.group_size} with {self.kind}")
        if self.kind is ScaleKind.NONE and self.zero_points:
            raise ValueError("zero_points need scales (kind 'none' has neither)")


def scales_for(dtype: str, head_dim: int) -> KVScales:
    """The scales a cache of logical `dtype` keeps: none for floats; float16 scales (their bytes count on the
    wire: float32 ones would put int8 at 0.53x of bf16 for head_dim 64) per token and head for int8; for int4
    per group (INT4_*_GROUP_SIZE) with a zero point (asymmetric), over Hadamard-rotated rows."""
    if dtype == "int8":
        return KVScales(ScaleKind.PER_TOKEN_HEAD, dtype="float16")
    if dtype == "int4":
        return KVScales(ScaleKind.GROUPED, group_size=min(INT4_KEY_GROUP_SIZE, head_dim), zero_points=True,
                        dtype="float16", value_group_size=min(INT4_VALUE_GROUP_SIZE, head_dim),
                        hadamard=True)
    return KVScales()


@dataclass(frozen=True)
class KVCacheSpec:
    """One layer's k (or v) block is `[block_size, num_kv_heads, head_dim // values_per_element]` of
    `storage_dtype` (both follow from the logical `dtype`, KV_FORMATS), plus the scale tensors
    `scale_shapes()` names. The KV cache owns one; the wire layout (kv_transfer.layout.KVLayout) derives
    from it."""

    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "float32"  # logical dtype: float32 | float16 | bfloat16 (int8 | int4 with scales)
    scales: KVScales = field(default_factory=KVScales)
    # int4 only: a hash of the calibrated per-(layer, kv head) key offsets every store subtracts ("" = none).
    # Writers of one sequence's cache must subtract the same offsets, so the handshake compares it.
    key_offset_digest: str = ""

    def __post_init__(self) -> None:
        for name in ("block_size", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"KVCacheSpec.{name} must be an int >= 1, got {value!r}")
        if self.dtype not in KV_FORMATS:
            raise ValueError(f"KV cache dtype must be one of {list(KV_FORMATS)}, got {self.dtype!r}")
        if self.head_dim % self.values_per_element:
            raise ValueError(f"head_dim {self.head_dim} does not pack {self.values_per_element} values per "
                             f"{self.storage_dtype} element")
        quantized, scaled = self.dtype in QUANTIZED_DTYPES, self.scales.kind is not ScaleKind.NONE
        if quantized != scaled:
            raise ValueError(f"a {self.dtype} KV cache needs "
                             f"{'scales' if quantized else 'no scales'}, got scales {self.scales.kind}")
        g = self.scales.group_size
        gv = self.scales.value_group_size
        if self.scales.kind is ScaleKind.GROUPED and (self.head_dim % g or self.head_dim % gv):
            raise ValueError(f"group sizes {g} (keys) and {gv} (values) must divide head_dim {self.head_dim}")
        if self.key_offset_digest and self.dtype != "int4":
            raise ValueError(f"key offsets are for int4 KV caches only, not {self.dtype}")
        if self.scales.hadamard and self.head_dim & (self.head_dim - 1):
            raise ValueError(f"a Hadamard rotation needs a power-of-two head_dim, got {self.head_dim}")

    @property
    def storage_dtype(self) -> str:
        """The dtype the cache tensors hold (int4: uint8)."""
        return KV_FORMATS[self.dtype][0]

    @property
    def values_per_element(self) -> int:
        """Logical values packed into one stored element (int4: 2 a byte)."""
        return KV_FORMATS[self.dtype][1]

    @property
    def is_quantized(self) -> bool:
        return self.dtype in QUANTIZED_DTYPES

    @property
    def block_shape(self) -> tuple[int, int, int]:
        """One block's logical shape: `[block_size, num_kv_heads, head_dim]` values."""
        return (self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def storage_block_shape(self) -> tuple[int, int, int]:
        """One block's stored shape (int4: head_dim / 2 bytes per token and head)."""
        return (self.block_size, self.num_kv_heads, self.head_dim // self.values_per_element)

    def scale_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-block shape of each scale tensor by name (`k_scale`, `v_scale`, `k_zero`, `v_zero`); none for
        float caches."""
        b, h, d = self.block_shape
        kind = self.scales.kind
        if kind is ScaleKind.NONE:
            return {}
        if kind is ScaleKind.PER_TOKEN_HEAD:
            k = v = (b, h)
        else:
            k, v = (b, h, d // self.scales.group_size), (b, h, d // self.scales.value_group_size)
        shapes = {"k_scale": k, "v_scale": v}
        if self.scales.zero_points:
            shapes |= {"k_zero": k, "v_zero": v}
        return shapes

    @property
    def value_bytes_per_block(self) -> int:
        """Bytes of one layer's k (or v) values in one block, scales not included."""
        b, h, d = self.storage_block_shape
        return b * h * d * STORAGE_ITEMSIZE[self.storage_dtype]

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one layer's k and v in one block, scales included."""
        scale_elems = sum(math.prod(shape) for shape in self.scale_shapes().values())
        return 2 * self.value_bytes_per_block + scale_elems * STORAGE_ITEMSIZE[self.scales.dtype]

    @property
    def bytes_per_token(self) -> int:
        """Bytes of one token's k and v in one layer, scales included: what the wire carries per token."""
        return self.bytes_per_block // self.block_size  # every tensor of a block is per token

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` tokens."""
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        return -(-num_tokens // self.block_size)

