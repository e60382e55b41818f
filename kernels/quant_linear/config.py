"""Launch configurations of the quantized linears: a handful of explicit candidates per kernel and row bucket.

`pick` takes each bucket's first candidate; bench/kernels/quant_gpu.py times all of them and prints the
fastest per shape, so the order here is what each tuning run edits (the comment above the lists says what
the last H100 run chose).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

SMS = 132  # H100 SXM: split-K aims at two programs per SM when row blocks alone leave SMs idle
MAX_SPLIT_K = 8
FEW_ROWS = 16  # up to this many rows a weight-streaming kernel with the rows padded to one MMA tile


@dataclass(frozen=True)
class QuantConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    block_m: int = 1  # 1: the GEMV path (fp32 multiply-adds); >= 16: tl.dot
    split_k: int = 1  # 0: as many as fill the SMs (auto_split_k)
    group_m: int = 8  # W8A8 GEMM: row blocks per L2 swizzle group
    words: bool = False  # W4A16 GEMV: read the packed weights as int32 words of eight nibbles, not bytes
    tma: bool = False  # W8A8 GEMM: tiles copied by Hopper's tensor memory accelerator, not pointer loads
    partials: bool = False  # W4A16 GEMV split-K: per-split slices summed by a second kernel, not atomics


# Weight-streaming kernels (W4A16 and w8): one row, up to FEW_ROWS rows, and (W4A16 only) more.
# Round 2 on H100 (Llama-3-8B layer shapes, g32 and g128): W4A16 one row best at the byte GEMV 4 × 1024
# (4 warps, 2 stages; fastest on o and down, within 7% elsewhere), the int32-word 16 × 1024 with auto split-K
# fastest on qkv and gate_up; W4A16 few rows at 64 × 256 with auto split-K (10 of 12 shapes); w8 one row at
# 4 × 1024 everywhere; w8 few rows at 32 × 256 auto split-K everywhere; W8A8 at the TMA 128 × 256 × 128
# (8 warps, 4 stages). Candidates that never won and were more than 1.3× the winner somewhere are gone.
W4_CANDIDATES: dict[str, tuple[QuantConfig, ...]] = {
    "one": (QuantConfig(4, 1024, 4, 2), QuantConfig(16, 1024, 4, 3, split_k=0, words=True),
            QuantConfig(8, 1024, 4, 3, words=True),
            # round 3, untimed: deeper pipelines of the winner's tile; one step over the whole K (x and the
            # weights in registers, no loop-carried pipeline; fit_k halves it where K is no power of two);
            # the words kernel at two stages like the bytes winner
            QuantConfig(4, 1024, 4, 4), QuantConfig(4, 512, 4, 5), QuantConfig(4, 2048, 8, 2),
            QuantConfig(8, 1024, 4, 2), QuantConfig(4, 4096, 8, 1), QuantConfig(2, 4096, 4, 1),
            QuantConfig(16, 1024, 4, 2, words=True),
            # split-K whose partials a second small kernel sums (no zeroing memset, no atomics, no cast)
            QuantConfig(16, 1024, 4, 2, split_k=2, words=True, partials=True),
            QuantConfig(8, 1024, 4, 2, split_k=2, partials=True),
            QuantConfig(16, 512, 4, 3, split_k=4, words=True, partials=True)),
    "few": (QuantConfig(64, 256, 4, 3, block_m=16, split_k=0), QuantConfig(64, 128, 4, 4, block_m=16),
            QuantConfig(32, 256, 4, 4, block_m=16, split_k=0)),
    "many": (QuantConfig(128, 64, 4, 3, block_m=64), QuantConfig(128, 64, 8, 3, block_m=128)),
}
W8_CANDIDATES: dict[str, tuple[QuantConfig, ...]] = {
    "one": (QuantConfig(4, 1024, 4, 3), QuantConfig(8, 512, 4, 3), QuantConfig(8, 1024, 4, 3),
            QuantConfig(4, 2048, 8, 3)),
    "few": (QuantConfig(32, 256, 4, 4, block_m=16, split_k=0),
            QuantConfig(64, 256, 4, 3, block_m=16, split_k=0)),
}
# W8A8 int8 × int8 GEMM (prefill-sized M): block_m × block_n output tiles, block_k int8 values deep. The TMA
# tiles need sm_90 and 16-byte rows: w8a8.default_config falls back to the first pointer-load candidate.
W8A8_CANDIDATES: tuple[QuantConfig, ...] = (
    QuantConfig(256, 128, 8, 4, block_m=128, tma=True), QuantConfig(128, 128, 8, 4, block_m=256, tma=True),
    QuantConfig(256, 128, 8, 3, block_m=128, tma=True),
    QuantConfig(256, 128, 8, 3, block_m=128), QuantConfig(256, 128, 8, 4, block_m=128),
    QuantConfig(128, 128, 8, 3, block_m=256), QuantConfig(128, 128, 8, 4, block_m=256),
    QuantConfig(256, 128, 8, 4, block_m=128, group_m=16),
)

def bucket(m: int) -> str:
    return "one" if m == 1 else "few" if m <= FEW_ROWS else "many"


def auto_split_k(config: QuantConfig, n: int, k: int) -> QuantConfig:
    """split_k = 0 → the smallest power of two that gives >= 2 programs per SM (at most MAX_SPLIT_K), keeping
    K a multiple of split_k · block_k; other configs unchanged."""
    if config.split_k:
        return config
    row_blocks = -(-n // config.block_n)
    split = 1
    while split < MAX_SPLIT_K and row_blocks * split < 2 * SMS and k % (2 * split * config.block_k) == 0:
        split *= 2
    return replace(config, split_k=split)


def fit_k(config: QuantConfig, k: int, multiple: int = 1) -> QuantConfig:
    """Halve block_k (down to 2 · multiple) until split_k · block_k divides K: small models' K (576) fit."""
    block_k = config.block_k
    while k % (config.split_k * block_k) and block_k > 2 * multiple:
        block_k //= 2
    return replace(config, block_k=block_k)


def pick(candidates: dict[str, tuple[QuantConfig, ...]], m: int, n: int, k: int) -> QuantConfig:
    """The launch config for an [m, k] × [n, k]ᵀ product: its bucket's first candidate, split-K resolved."""
    options = candidates.get(bucket(m)) or candidates["few"]
    return fit_k(auto_split_k(options[0], n, k), k)
