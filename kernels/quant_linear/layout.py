"""The weight layouts the quantized linear kernels read, and the repack from our W4A16 (q, d, m) triples."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class W4Weight:
    """Group-wise asymmetric int4 weight [N, K]: w = q · scale + low per group of `group_size` along K.

    packed: uint8 [N, K / 2], byte b of a row holds q[2b] (low nibble) and q[2b + 1] (high nibble), so a row
    is contiguous along K and a tile of rows loads coalesced (the int4 KV cache packs its pairs the same way).
    scale, low: float16 [N, K / group_size] (GGUF Q4_1 keeps d and m as float16: its blocks repack exactly).
    """

    packed: torch.Tensor
    scale: torch.Tensor
    low: torch.Tensor
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], 2 * self.packed.shape[1]

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.low))


@dataclass(frozen=True)
class W8Weight:
    """Symmetric per-output-channel int8 weight [N, K]: w = q · scale[n] (engine/quantize/w8a8's format)."""

    q: torch.Tensor  # int8 [N, K], rows contiguous along K
    scale: torch.Tensor  # float32 [N]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    @property
    def num_bytes(self) -> int:
        return self.q.numel() + self.scale.numel() * 4


def pack_w4(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> W4Weight:
    """Our W4A16 representation (engine/quantize/int4.quantize_int4, gguf_q4_1.split_q4_1: q uint8 [N, K] in
    0..15, d and m [N, K / g] with w = d·q + m) → the kernels' layout, on q's device."""
    n, k = q.shape
    groups = d.shape[1]
    if k % 2 or k % groups or d.shape != m.shape or d.shape[0] != n:
        raise ValueError(f"int4 weight [{n}, {k}] with scales {tuple(d.shape)} / mins {tuple(m.shape)}")
    codes = q.to(torch.uint8)
    packed = (codes[:, 0::2] & 0xF) | (codes[:, 1::2] << 4)
    return W4Weight(packed.contiguous(), d.to(torch.float16).contiguous(), m.to(torch.float16).contiguous(),
                    k // groups)


def unpack_w4(weight: W4Weight) -> torch.Tensor:
    """The codes q uint8 [N, K] in 0..15 back from the packed bytes."""
    p = weight.packed
    return torch.stack((p & 0xF, p >> 4), dim=-1).reshape(p.shape[0], -1)
