"""Quantized KV rows in torch: the int8 / int4 formats the stores write and attention reads (reference)."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

# Smallest scale stored (float16's smallest normal): an all-zero row divides by it, not by 0.
MIN_SCALE = 2.0**-14
INT8_MAX = 127
INT4_MAX = 15
# Least-squares refits of an int4 group's scale and zero to its codes (each followed by rounding to the new
# grid): alternating minimization of the group's squared error from the min/max grid. Chosen by perplexity
# (docs/benchmarks.md, "KV cache quantization"): 0 → +5.76%, 2 → +4.86%, 5 → +3.71%, 10 → +3.70%.
INT4_REFIT_STEPS = 5


@dataclass(frozen=True)
class QuantizedKV:
    """One layer's k (or v) blocks of a quantized cache as stored, handed to the kernels in place of a tensor.

    codes: [num_blocks, block_size, Hk, D] int8 (symmetric, `scale` [num_blocks, block_size, Hk]), or
    [..., D // 2] uint8 of int4 pairs (value 2j in the low nibble, 2j+1 in the high one) with `scale` and
    `zero` [num_blocks, block_size, Hk, D // group_size]: value = code * scale + zero. `hadamard`: the stored
    rows are x @ H (hadamard_matrix), so x = stored @ H. `offset` (int4 keys only): a float32 [Hk, D] vector
    subtracted from every row before it is rotated and quantized; readers never add it back, since a key
    offset shifts all of a query's scores by the same q·offset, which softmax ignores.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None
    group_size: int = 0  # int4 only: values per scale along head_dim
    hadamard: bool = False
    offset: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.bits == 4 and (self.zero is None or self.group_size < 1):
            raise ValueError("int4 KV needs zero points and a group size")
        if self.offset is not None and self.bits == 8:
            raise ValueError("a KV offset is for int4 caches only")
        if self.offset is not None and (self.offset.dtype != torch.float32 or not self.offset.is_contiguous()
                                        or tuple(self.offset.shape) != self.shape[2:]):
            raise ValueError(f"a KV offset must be contiguous float32 {list(self.shape[2:])}, got "
                             f"{self.offset.dtype} {list(self.offset.shape)}")

    @property
    def bits(self) -> int:
        return 8 if self.codes.dtype == torch.int8 else 4

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The logical shape [num_blocks, block_size, Hk, D], like a float cache's."""
        blocks, block_size, heads, stored = self.codes.shape
        return (blocks, block_size, heads, stored * (2 if self.bits == 4 else 1))

    @property
    def device(self) -> torch.device:
        return self.codes.device


@functools.lru_cache(maxsize=8)
def hadamard_matrix(dim: int, device: torch.device) -> torch.Tensor:
    """The normalized Sylvester Hadamard matrix [dim, dim] (dim a power of two): symmetric, H @ H = I."""
    h = torch.ones(1, 1)
    while h.shape[0] < dim:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return (h / math.sqrt(dim)).to(device)


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] → (int8 codes [..., D], float16 scales [...]): symmetric, one scale per row."""
    x = x.float()
    scale = (x.abs().amax(dim=-1) / INT8_MAX).clamp_min(MIN_SCALE).half()
    # floor(y + 0.5), not torch.round (half to even): the Triton store rounds the same way.
    codes = torch.floor(x / scale.float().unsqueeze(-1) + 0.5).clamp_(-INT8_MAX, INT8_MAX)
    return codes.to(torch.int8), scale


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (codes.float() * scale.float().unsqueeze(-1)).to(dtype)


def _int4_codes(groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The nearest codes 0..15 of groups [..., G, group_size] on the grid code * scale + zero (float16)."""
    q = torch.floor((groups - zero.float().unsqueeze(-1)) / scale.float().unsqueeze(-1) + 0.5)
    return q.clamp_(0, INT4_MAX)


def quantize_int4(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., D] → (uint8 codes [..., D // 2], float16 scales and zeros [..., D // group_size]): asymmetric,
    per group of `group_size` values along D. The grid starts at the group's min / max, then INT4_REFIT_STEPS
    times: scale and zero refitted by least squares to the codes, and the codes rounded to the new grid."""
    groups = x.float().unflatten(-1, (-1, group_size))
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((high - low) / INT4_MAX).clamp_min(MIN_SCALE).half()
    zero = low.half()
    q = _int4_codes(groups, scale, zero)
    mean = groups.sum(dim=-1) / group_size  # sum / n, as the Triton store computes it
    centered = groups - mean.unsqueeze(-1)
    for _ in range(INT4_REFIT_STEPS):
        q_mean = q.sum(dim=-1) / group_size
        dq = q - q_mean.unsqueeze(-1)
        var = (dq * dq).sum(dim=-1)
        # A group of one code (constant values) keeps its scale: any scale fits it.
        fitted = torch.where(var > 0, (dq * centered).sum(dim=-1) / var.clamp_min(1e-9), scale.float())
        fitted = fitted.clamp_min(MIN_SCALE)
        scale, zero = fitted.half(), (mean - fitted * q_mean).half()
        q = _int4_codes(groups, scale, zero)
    q = q.to(torch.uint8).flatten(-2)
    return q[..., 0::2] | (q[..., 1::2] << 4), scale, zero


def dequantize_int4(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    q = torch.stack((codes & 0xF, codes >> 4), dim=-1).flatten(-2).float()
    group_size = q.shape[-1] // scale.shape[-1]
    values = q.unflatten(-1, (-1, group_size)) * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)
    return values.flatten(-2).to(dtype)


def store_rows(x: torch.Tensor, cache: QuantizedKV, slots: torch.Tensor) -> None:
    """Quantize rows x [T, Hk, D] into cache slots `slots` [T] (codes and their scales)."""
    def rows(t: torch.Tensor) -> torch.Tensor:  # [num_blocks, block_size, ...] → one row per slot
        return t.view(-1, *t.shape[2:])

    if cache.bits == 8:
        codes, scale = quantize_int8(x)
        rows(cache.scale).index_copy_(0, slots, scale)
    else:
        if cache.offset is not None:
            x = x.float() - cache.offset
        if cache.hadamard:
            x = x.float() @ hadamard_matrix(x.shape[-1], x.device)
        codes, scale, zero = quantize_int4(x, cache.group_size)
        rows(cache.scale).index_copy_(0, slots, scale)
        rows(cache.zero).index_copy_(0, slots, zero)
    rows(cache.codes).index_copy_(0, slots, codes)


def dequantize_blocks(cache: QuantizedKV, block_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The blocks `block_ids` of `cache` as values [len(block_ids), block_size, Hk, D] of `dtype`: one
    sequence's context, never the whole cache."""
    codes, scale = cache.codes.index_select(0, block_ids), cache.scale.index_select(0, block_ids)
    if cache.bits == 8:
        return dequantize_int8(codes, scale, dtype)
    values = dequantize_int4(codes, scale, cache.zero.index_select(0, block_ids), torch.float32)
    if cache.hadamard:
        values = values @ hadamard_matrix(values.shape[-1], values.device)
    return values.to(dtype)
