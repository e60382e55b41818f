"""The weight layouts cpu_quant.c streams: Q4_1 repacked for shift-and-mask dequantization, Q8_0 as stored;
and F32Weight, fp32 rows in pairs as f32_linear.c streams them (the fused decode step takes all three)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

QK = 32  # weights per block (one d, and for Q4_1 one m): GGUF's block size
CHUNK = 64  # Q4_1 weights per 32-byte chunk: 8 int32 words of 8 nibbles


@dataclass(frozen=True)
class Q41Weight:
    """w = d·q + m per block of 32 along K, q in 0..15, for a [N, K] weight (K a multiple of 32).

    packed: uint8 [N, ceil(K / 64) · 32]; in chunk c of a row, 32-bit word L (little-endian) holds
    q[64c + 8i + L] in its nibble i, so one shift and mask of the chunk gives 8 consecutive weights in
    8 lanes (a last half chunk, K % 64 == 32, is zero-padded). d, m: float16 [N, K / 32] (GGUF Q4_1's own
    precision, so its blocks repack exactly).
    """

    packed: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.d.shape[0], self.d.shape[1] * QK

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.d, self.m))


@dataclass(frozen=True)
class Q80Weight:
    """w = d·q per block of 32 along K: q int8 [N, K] (GGUF Q8_0's values), d float32 [N, K / 32]."""

    q: torch.Tensor
    d: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    @property
    def num_bytes(self) -> int:
        return self.q.numel() + self.d.numel() * 4


@dataclass(frozen=True)
class F32Weight:
    """An fp32 [N, K] weight packed for f32_linear.c: f32_ops.pack_pairs' [N / 2, K / 8, 2, 8]."""

    packed: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        half, blocks, _, lanes = self.packed.shape
        return 2 * half, blocks * lanes


def _check_blocks(n: int, k: int, *scales: torch.Tensor) -> None:
    if k % QK or any(tuple(s.shape) != (n, k // QK) for s in scales):
        raise ValueError(f"weight [{n}, {k}] needs K a multiple of {QK} and scales of shape "
                         f"[{n}, {k // QK}], got {[tuple(s.shape) for s in scales]}")


def pack_q4_1(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> Q41Weight:
    """(q uint8 [N, K] in 0..15, d, m [N, K / 32]) — split_q4_1's and quantize_int4's triple — → Q41Weight
    (d and m rounded to float16: exact for GGUF's blocks)."""
    n, k = q.shape
    _check_blocks(n, k, d, m)
    chunks = -(-k // CHUNK)
    codes = torch.zeros(n, chunks * CHUNK, dtype=torch.int64)
    codes[:, :k] = q.to(torch.int64)
    # [N, chunk, slot i, lane L] → word L = Σ_i q[64c + 8i + L] << 4i
    slots = codes.view(n, chunks, 8, 8).transpose(2, 3)
    words = (slots << (4 * torch.arange(8))).sum(-1)  # [N, chunk, 8] in 0..2^32 - 1
    packed = ((words.unsqueeze(-1) >> (8 * torch.arange(4))) & 0xFF).to(torch.uint8).view(n, chunks * 32)
    return Q41Weight(packed, d.to(torch.float16).contiguous(), m.to(torch.float16).contiguous())


def unpack_q4_1(weight: Q41Weight) -> torch.Tensor:
    """Q41Weight → q uint8 [N, K] (the inverse of pack_q4_1's nibble order)."""
    n, k = weight.shape
    words = weight.packed.view(torch.int32).view(n, -1, 8).to(torch.int64) & 0xFFFFFFFF
    slots = (words.unsqueeze(-1) >> (4 * torch.arange(8))) & 0xF  # [N, chunk, lane L, slot i]
    return slots.transpose(2, 3).reshape(n, -1)[:, :k].to(torch.uint8)


def split_q8_0(raw: torch.Tensor, rows: int) -> Q80Weight:
    """Raw GGUF Q8_0 bytes (uint8) of a [rows, K] tensor → Q80Weight (ggml's block_q8_0: fp16 d, 32 int8)."""
    blocks = raw.reshape(rows, -1, 34)
    d = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1).float()
    q = blocks[..., 2:].contiguous().view(torch.int8).reshape(rows, -1)
    return Q80Weight(q.contiguous(), d.contiguous())


def q8_0_of(q: torch.Tensor, d: torch.Tensor) -> Q80Weight:
    """(q int8 [N, K], d [N, K / 32]) → Q80Weight (checked, contiguous)."""
    n, k = q.shape
    _check_blocks(n, k, d)
    return Q80Weight(q.to(torch.int8).contiguous(), d.float().contiguous())
