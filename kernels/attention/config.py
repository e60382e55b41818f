"""Launch configuration of the Triton attention kernels: split-K counts and tile sizes (tuned on an H100)."""
from __future__ import annotations

import functools

import torch
import triton

# Split-K bounds: 64-token splits let a bs1 decode over a short context use the GPU (more live splits, about
# half the time a layer at ctx512: docs/benchmarks.md); 32 is the most the sweep tried.
_MIN_TOKENS_PER_SPLIT = 64
_MAX_SPLITS = 32
# Up to this many splits the last split program of a (sequence, KV head) merges the partials itself instead of
# a second kernel (its [heads, splits, head_dim] tile stays in registers); more splits (bs1 over a long
# context) keep the merge kernel.
_MAX_IN_PLACE_SPLITS = 8


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # interpreter: any small number; it only shapes the split heuristic
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device,
                      kv_bits: int = 0, quads: bool = False) -> int:
    """KV splits per (sequence, KV head): enough programs for ~2 waves on the GPU (int4 caches read by the
    dequantizing kernel: INT4_SPLIT_WAVES times that, up to twice the splits; by the quad kernel
    (`quads`): INT4_QUAD_SPLIT_WAVES times), >= 64 tokens per split."""
    programs = num_seqs * num_kv_heads
    waves = (INT4_QUAD_SPLIT_WAVES if quads else INT4_SPLIT_WAVES) if kv_bits == 4 else 1
    wanted = -(-2 * waves * _num_sms(device) // max(programs, 1))
    by_length = max(max_seq_len // _MIN_TOKENS_PER_SPLIT, 1)
    return max(1, min(wanted, by_length, _MAX_SPLITS * (2 if waves > 1 else 1)))


def merge_in_place(num_splits: int) -> bool:
    """Whether a split-K decode launch merges its partials in its own last program (no reduce kernel)."""
    return 1 < num_splits <= _MAX_IN_PLACE_SPLITS


def _programs_per_sm(stages: int) -> int:
    return 3 if stages == 2 else 2  # 64 or 96 KB of K/V tiles a program (head_dim 128, 64-token tiles)


def _last_wave_fill(programs: int, per_sm: int, sms: int) -> float:
    slots = per_sm * sms
    return programs / (-(-programs // slots) * slots)


# int8 KV decode tiles (BLOCK_N, num_warps, num_stages): an int8 K/V tile holds half a bf16 tile's bytes, so
# longer tiles or deeper pipelines fit the same shared memory. bench/kernels/quant_gpu_attention.py sweeps
# these and the first is the launch's (None would mean the bf16 cache's choice). (64, 4, 3) measured on an
# H100 at ctx 8k with the bench's split count: B=1 0.92x, B=16 1.37x, B=64 1.00x the bf16 cache's time, where
# the bf16 choice gave int8 0.92x / 0.86x / 1.00x (docs/benchmarks.md, "Quantized kernels on the H100").
INT8_DECODE_TILES: tuple[tuple[int, int, int] | None, ...] = (
    (64, 4, 3), (64, 4, 4), (64, 8, 3), (128, 4, 2), (128, 4, 3), (128, 8, 2), (128, 8, 3), (32, 4, 3),
)


# How int4 KV decode reads its codes, the first the launch's. 2 is int4_decode.py's kernel (the codes feed the
# dots as int16 quads centered to c − 8, never dequantized; taken where int4_decode.quads_fit holds, else
# mode 1): 1.80x / 1.69x the bf16 cache's speed at B = 16 / 64 on an H100 at ctx 8k, within the dequantizing
# kernel's error of the reference there (docs/benchmarks.md, "int4 KV decode on tensor cores"). 1 and 0 are
# the dequantizing kernel's (tiles._dequantize's INT4_DEQUANT; the prefill kernel's is INT4_PREFILL_DEQUANT):
# 1 loads scales and zeros once per group and builds floats from the nibbles' bits
# (tiles._dequantize_int4_groups), 0.75-0.92x the bf16 cache's time; 0 gathers a scale and a zero per value
# and converts each code int → float (0.34–0.39x, docs/benchmarks.md). 1 leads 0 on ptxas's sm_90
# code (decode loop 2141 instructions, no spills, vs 9459 with 3856 local-memory spill loads and stores;
# prefill 2448 vs 6546: docs/benchmarks.md); bench/kernels/quant_gpu_attention.py times all three.
INT4_DEQUANT_MODES: tuple[int, ...] = (2, 1, 0)
INT4_QUADS = 2
INT4_PREFILL_DEQUANT = 1
# int4 KV decode launches (head_dim 128): (BLOCK_N, num_warps, num_stages) and how many more programs than
# config's ~2 waves. With the bf16 cache's 64-key tiles and ~2 waves int4 ran at 0.70–0.83x the bf16 cache's
# time on an H100 at ctx 8k; 32-key tiles, 3 stages and 4x the waves 0.84–1.00x in the same run (num_stages
# alone changed nothing, and loading each tile one iteration ahead by hand lost: docs/benchmarks.md, "int4 KV
# decode: tiles, splits, a hand prefetch").
INT4_DECODE_TILES: tuple[int, int, int] = (32, 4, 3)
INT4_SPLIT_WAVES = 4
# The quad kernel's launch (BLOCK_N, num_warps, num_stages) and waves: an H100 sweep at ctx 8k (64- and
# 32-key tiles, 2-4 stages, 1-4x the splits) led with 128 keys, 3 stages, ~2 waves (docs/benchmarks.md).
INT4_QUAD_TILES: tuple[int, int, int] = (128, 4, 3)
INT4_QUAD_SPLIT_WAVES = 1
# Registers a thread of the quad kernel may hold (ptxas's maxnreg): unbounded it takes ~250 at 128-key tiles,
# two programs an SM; capped at 168 three fit (a few spills, sm_90 offline ptxas). Which one runs faster
# follows the last wave's fill (H100: B=16 98 vs 126 us capped, B=64 493 vs 410): quad_max_registers.
INT4_QUAD_MAX_REGISTERS = 168


def quad_max_registers(programs: int, device: torch.device) -> int:
    """The quad kernel's register cap for a launch of `programs`: INT4_QUAD_MAX_REGISTERS (three programs an
    SM) unless two an SM fill the last wave better; 0 means no cap."""
    sms = _num_sms(device)
    three, two = (_last_wave_fill(programs, per_sm, sms) for per_sm in (3, 2))
    return INT4_QUAD_MAX_REGISTERS if three >= two else 0


# int8 KV decode dots (tiles.attend_kv's INT8_FP16), the first the launch's: False puts the codes in the
# query's dtype (bf16: a conversion a value); True converts the query to float16 once, the codes by bit
# tricks.
INT8_FP16_MODES: tuple[bool, ...] = (False, True)


def decode_config(head_dim: int, interpreted: bool, programs: int = 1,
                  device: torch.device | None = None, kv_bits: int = 0,
                  quads: bool = False) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) of a decode launch of `programs` programs.

    At head_dim 128 a stage holds 32 KB of K/V tiles: two stages fit three programs on an SM, three stages
    two. The launch takes the depth whose last wave is fuller (ties: two): on an H100 that is two stages
    at bs16 (384 programs) and three at bs32 (512 programs), each the faster there (docs/benchmarks.md).
    """
    if interpreted:
        return 16, 1, 1  # the interpreter's cost grows with tile size
    if head_dim > 128:
        return 32, 4, 2
    if kv_bits == 8 and head_dim == 128 and INT8_DECODE_TILES[0] is not None:
        return INT8_DECODE_TILES[0]
    if kv_bits == 4 and head_dim == 128:
        return INT4_QUAD_TILES if quads else INT4_DECODE_TILES
    sms = _num_sms(device) if device is not None else 132
    fill2, fill3 = (_last_wave_fill(programs, _programs_per_sm(s), sms) for s in (2, 3))
    return (64, 4, 2) if fill2 >= fill3 else (64, 4, 3)


def preload_first_tile(programs: int, stages: int, device: torch.device) -> bool:
    """Whether decode programs read their first KV tile before the PDL wait: when the launch fits one wave.

    A second wave would park its programs behind the first with their tiles loaded; measured, it loses there
    (docs/benchmarks.md).
    """
    if device.type != "cuda":
        return True  # the interpreter: exercise the path in tests
    return programs <= _programs_per_sm(stages) * _num_sms(device)


def prefill_config(head_dim: int, max_query_len: int, interpreted: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the prefill kernel (H100 sweep: 64/64/4/3 led, D=128)."""
    if interpreted:
        return 16, 16, 1, 1
    # Short chunks (speculative verification, small tails) get short row tiles instead of padding to 64.
    rows = max(16, triton.next_power_of_2(max_query_len))
    if head_dim <= 128:
        return min(64, rows), 64, 4, 3
    return min(32, rows), 32, 4, 2
