"""Launch configurations of the quantized linears: a handful of explicit candidates per kernel and row bucket.

`pick` takes each bucket's first candidate; bench/kernels/quant_gpu.py times all of them and prints the
fastest per shape, so the order here is what each tuning run edits (the comment above the lists says what
the last H100 run chose).
"""
from __future__ import annotations

from collections.abc import Callable
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
    mma: bool = False  # W4A16: the tensor-core kernel (w4a16_mma), any row count, M = 1 padded to block_m
    stationary: bool = False  # W4A16 one row: x's K slice held in registers, rows streamed (w4a16_stationary)
    per_sm: int = 0  # stationary: persistent programs an SM (over all splits) the grid aims at


# Weight-streaming kernels (W4A16 and w8): one row, up to FEW_ROWS rows, and (W4A16 only) more.
# Round 2 on H100 (Llama-3-8B layer shapes, g32 and g128): W4A16 one row best at the byte GEMV 4 × 1024
# (4 warps, 2 stages; fastest on o and down, within 7% elsewhere), the int32-word 16 × 1024 with auto split-K
# fastest on qkv and gate_up; W4A16 few rows at 64 × 256 with auto split-K (10 of 12 shapes); w8 one row at
# 4 × 1024 everywhere; w8 few rows at 32 × 256 auto split-K everywhere; W8A8 at the TMA 128 × 256 × 128
# (8 warps, 4 stages). Candidates that never won and were more than 1.3× the winner somewhere are gone.
# Session 10 on H100 (g128): the tensor-core W4A16 kernel (w4a16_mma, block_k dividing the group) at 64 × 128,
# 4 warps, 4 stages, auto split-K took few rows (M = 16) from 0.85-1.14× to 1.42-2.08× bf16; at one row it
# reached 1.3-2.06×, behind the byte GEMV's 2.02-2.22× (bench/results/quant_w4_mma_round1_s10.txt). Round 2
# (quant_w4_mma_round2_s10.txt): split-K merged in place took M = 16 to 1.63-2.16× (atomics 1.43-2.14×); at
# one row the merged kernel led only on down (2.16× vs the GEMV's 2.05×), so the GEMV stays first there. Group
# sizes it cannot serve (32) and fp32 inputs fall through to the next candidate that fits (pick).
W4_CANDIDATES: dict[str, tuple[QuantConfig, ...]] = {
    # Session 15 on H100 (g128, bench/results/quant_stationary_round2_s15.txt; µs at M = 1 and × cuBLAS bf16):
    # 4 × 4096, four rows a thread, one slice for K = 4096, leads qkv / o (6.6 / 5.0: 3.07 / 3.05×) and is
    # within 3% on gate_up (25.7: 3.19×); 8 × 2048 at 3 stages leads down (14.6: 2.91×; plain 14.8), where
    # session 14's pick 4 × 1024 took 20.4 (this session's kernel: runs that fill the grid, the first
    # block outside the loop, its scales before the PDL wait; not separated). Stationary configs keep
    # their K slice (fit_k): each serves the K its block_k divides, so down takes the second. Pipelining
    # (num_stages 2-3, cp.async) moved nothing beyond noise: two stages lost on every shape (dropped, with
    # 4 × 1024 and 8 × 512 at eight programs an SM: 1.4-1.55× the winner everywhere); the others stay
    # within 1.25× of it, but 8 × 2048 at three stages on qkv / o (1.33 / 1.27×), which 4 × 4096 takes.
    "one": (QuantConfig(4, 4096, 4, 1, stationary=True, per_sm=4),
            QuantConfig(8, 2048, 4, 3, stationary=True, per_sm=4),
            QuantConfig(4, 4096, 4, 3, stationary=True, per_sm=4),
            QuantConfig(4, 4096, 4, 1, stationary=True, per_sm=5),
            QuantConfig(8, 2048, 4, 1, stationary=True, per_sm=4),
            QuantConfig(4, 2048, 2, 1, stationary=True, per_sm=8),
            QuantConfig(8, 4096, 8, 1, stationary=True, per_sm=2),
            # what the stationary GEMV cannot serve (fp32 rows, K no slice divides) falls through to these
            QuantConfig(4, 1024, 4, 2), QuantConfig(16, 1024, 4, 3, split_k=0, words=True),
            QuantConfig(8, 1024, 4, 3, words=True),
            # round 3 (timed in session 15: 1.4-2.6× the stationary winner at each 8B shape): deeper
            # pipelines of the byte tile; one step over the whole K (fit_k halves it where K is no power of
            # two); the words kernel at two stages like the bytes winner
            QuantConfig(4, 1024, 4, 4), QuantConfig(4, 512, 4, 5), QuantConfig(4, 2048, 8, 2),
            QuantConfig(8, 1024, 4, 2), QuantConfig(4, 4096, 8, 1), QuantConfig(2, 4096, 4, 1),
            QuantConfig(16, 1024, 4, 2, words=True),
            # split-K merged in place by the last split (no zeroing memset, no atomics, no cast); untimed
            # since the merge replaced the second kernel that summed them
            QuantConfig(16, 1024, 4, 2, split_k=2, words=True, partials=True),
            QuantConfig(8, 1024, 4, 2, split_k=2, partials=True),
            QuantConfig(16, 512, 4, 3, split_k=4, words=True, partials=True),
            # session 10: the tensor-core kernel, its row padded to block_m (8 or 16), split-K merged in place
            # (64 × 128 at 16 rows led on down; the others within 1.26× of the winner everywhere)
            *(QuantConfig(bn, 128, 4, 4, block_m=bm, split_k=0, mma=True, partials=True)
              for bn, bm in ((64, 16), (64, 8), (128, 8)))),
    # round 2 at 16 rows: the first within 3% of each shape's best; atomic 64 × 128 tied it on gate_up,
    # 128 × 128 at 8 warps led on o and down by 1-3%
    "few": (QuantConfig(64, 128, 4, 4, block_m=16, split_k=0, mma=True, partials=True),
            # the tl.dot kernel for what the tensor-core one cannot serve (g32, fp32 inputs)
            QuantConfig(64, 256, 4, 3, block_m=16, split_k=0), QuantConfig(64, 128, 4, 4, block_m=16),
            QuantConfig(32, 256, 4, 4, block_m=16, split_k=0),
            QuantConfig(64, 128, 4, 4, block_m=16, split_k=0, mma=True),
            QuantConfig(128, 128, 8, 4, block_m=16, split_k=0, mma=True, partials=True)),
    "many": (QuantConfig(128, 64, 4, 3, block_m=64), QuantConfig(128, 64, 8, 3, block_m=128),
             # session 10, untimed (bench/kernels/quant_gpu times W4A16 at 1 and 16 rows only)
             QuantConfig(128, 128, 4, 3, block_m=64, mma=True),
             QuantConfig(128, 128, 8, 3, block_m=128, mma=True),
             QuantConfig(128, 64, 8, 4, block_m=128, mma=True)),
}
# Session 13 on H100 (g128, M = 1): the w8 loop pipelined (tl.range num_stages: cp.async copies that many
# tiles ahead) at 8 × 512, 3 stages: 1.77 / 1.79 / 1.85 / 1.89× bf16 on qkv / o / gate_up / down, where
# 4 × 1024 unpipelined gave 1.59 / 1.79 / 1.80 / 1.83× in the same call; the same pipelining cost every
# W4A16 GEMV 3-16% (its loop is bound by instructions, not by loads in flight), so those loops stay plain.
W8_CANDIDATES: dict[str, tuple[QuantConfig, ...]] = {
    "one": (QuantConfig(8, 512, 4, 3), QuantConfig(8, 512, 4, 4), QuantConfig(8, 1024, 4, 3),
            QuantConfig(4, 1024, 4, 3), QuantConfig(16, 512, 4, 4)),
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
    if config.stationary:  # its block_k is the K slice a program holds: it serves the K that block_k divides
        return config
    block_k = config.block_k
    while k % (config.split_k * block_k) and block_k > 2 * multiple:
        block_k //= 2
    return replace(config, block_k=block_k)


def pick(candidates: dict[str, tuple[QuantConfig, ...]], m: int, n: int, k: int,
         fits: Callable[[QuantConfig], bool] = lambda config: True) -> QuantConfig:
    """The launch config for an [m, k] × [n, k]ᵀ product: its bucket's first candidate (split-K resolved)
    that `fits` these operands (W4A16: the group size and input dtype decide which kernels can run)."""
    for candidate in candidates.get(bucket(m)) or candidates["few"]:
        config = fit_k(auto_split_k(candidate, n, k), k)  # resolved one at a time: the first usually fits
        if fits(config):
            return config
    raise ValueError(f"no launch config fits a [{m}, {k}] × [{n}, {k}]ᵀ product here")
