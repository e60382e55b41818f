"""Launch configuration of the Triton attention kernels: split-K counts and tile sizes (tuned on an H100)."""
from __future__ import annotations

import functools

import torch
import triton

from kernels.device import num_sms

# Split-K bounds: 64-token splits let a bs1 decode over a short context use the GPU (more live splits, about
# half the time a layer at ctx512: docs/benchmarks.md); 32 is the most the sweep tried.
_MIN_TOKENS_PER_SPLIT = 64
_MAX_SPLITS = 32
# Up to this many splits the last split program of a (sequence, KV head) merges the partials itself instead of
# a second kernel (tiles.merge_splits reads them eight splits at a time); more (the int4 dequantizing kernel's
# doubled split counts) keep the merge kernel. Session 15 raised it from 8, where the whole [heads, splits,
# head_dim] tile was read at once, so that a bs-1 step's graph (32 splits) drops its 32 merge launches.
_MAX_IN_PLACE_SPLITS = 32
# int8 and int4-quad decode launches: efficiencies (_efficiency) within this fraction of the best count as
# equal (the fewer splits then win).
_FILL_TIE = 0.05


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device,
                      kv_bits: int = 0, quads: bool = False) -> int:
    """KV splits per (sequence, KV head). Float caches: enough programs for ~2 waves on the GPU, >= 64
    tokens per split (int4 caches read by the dequantizing kernel: INT4_SPLIT_WAVES times the waves, up to
    twice the splits). int8 caches read by the split-K kernel and the int4 quad kernel (`quads`):
    int8_launch's and quad_launch's (the int8 pairs kernel's: pairs_launch)."""
    programs = num_seqs * num_kv_heads
    if kv_bits == 8:
        return int8_launch(programs, max_seq_len, device)[0]
    if kv_bits == 4 and quads:
        return quad_launch(programs, max_seq_len, device)[0]
    waves = INT4_SPLIT_WAVES if kv_bits == 4 else 1
    wanted = -(-2 * waves * num_sms(device) // max(programs, 1))
    by_length = max(max_seq_len // _MIN_TOKENS_PER_SPLIT, 1)
    return max(1, min(wanted, by_length, _MAX_SPLITS * (2 if waves > 1 else 1)))


def _efficiency(programs: int, tiles: int, splits: int, per_sm: int, sms: int) -> float:
    """The share of the SM slots a launch holds that does work: `programs` (sequence, KV head) pairs of
    `tiles` key tiles, each cut into `splits` of whole tiles (tiles.decode_program rounds a split up to a
    tile), `per_sm` programs an SM at a time. The last wave's fill times the splits' tile rounding."""
    slots = per_sm * sms
    waves = -(-programs * splits // slots)
    return programs * tiles / (waves * slots * -(-tiles // splits))


def _fewest(options: dict) -> tuple:
    """The smallest key (splits first) whose efficiency is within _FILL_TIE of the best."""
    best = max(options.values())
    return min(key for key, value in options.items() if value >= best * (1 - _FILL_TIE))


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
# these; the first two are the launch's (int8_launch). With the block ids read a tile ahead
# (tiles.block_ids), an H100 sweep at ctx 8k, B = 8-64 (docs/benchmarks.md, "int8 / quad launches by the
# last wave's fill") led with 128-key tiles at the split count int8_launch picks: 1.41-1.49x the bf16
# cache's time at B = 16-64, where (64, 4, 3) ran 1.24-1.38x; 128-key tiles lost where a split held two of
# them (B = 1).
# Both take ~180-255 registers: two programs an SM (INT8_PROGRAMS_PER_SM, sm_90 offline ptxas).
INT8_DECODE_TILES: tuple[tuple[int, int, int], ...] = (
    (128, 4, 3), (64, 4, 3), (64, 4, 4), (64, 8, 3), (128, 4, 2), (128, 8, 2), (128, 8, 3), (32, 4, 3),
)
INT8_PROGRAMS_PER_SM = 2
_LONG_SPLIT_TILES = 4  # int8 splits of fewer 128-key tiles than this take 64-key tiles


def int8_launch(programs: int, max_seq_len: int, device: torch.device,
                num_splits: int | None = None) -> tuple[int, tuple[int, int, int]]:
    """(splits, tiles) of an int8 decode over `programs` (sequence, KV head) pairs (or at `num_splits`):
    128-key tiles at the fewest splits of near-best _efficiency among those of more than one wave (where
    there are any), if each split then holds _LONG_SPLIT_TILES tiles; else 64-key tiles, the fewest
    splits of near-best efficiency, <= 64 tokens a split apart (the float caches' rule)."""
    tile_counts = tuple(max(1, -(-max_seq_len // tiles[0])) for tiles in INT8_DECODE_TILES[:2])
    return _int8_launch(programs, tile_counts, num_sms(device), num_splits)


@functools.lru_cache(maxsize=4096)  # keyed by tile counts: an eager decode's context grows a token a step
def _int8_launch(programs: int, tile_counts: tuple[int, int], sms: int,
                 num_splits: int | None) -> tuple[int, tuple[int, int, int]]:
    long, short = INT8_DECODE_TILES[:2]
    for tiles, n in zip((long, short), tile_counts, strict=True):
        counts = [num_splits] if num_splits else list(range(1, min(n, _MAX_SPLITS) + 1))
        if tiles is long:
            counts = [s for s in counts if s * programs > INT8_PROGRAMS_PER_SM * sms] or counts
        (splits,) = _fewest({(s,): _efficiency(programs, n, s, INT8_PROGRAMS_PER_SM, sms) for s in counts})
        if tiles is short or -(-n // splits) >= _LONG_SPLIT_TILES:
            return splits, tiles
    raise AssertionError("unreachable: the short tiles always return")


# How int4 KV decode reads its codes, the first the launch's. 2 is int4_decode.py's kernel (the codes feed the
# dots as int16 quads centered to c − 8, never dequantized; taken where int4_decode.quads_fit holds, else
# mode 1): 1.73-1.97x the bf16 cache's speed at B = 8-64 on an H100 at ctx 8k, within the dequantizing
# kernel's error of the reference there (docs/benchmarks.md, "The int4 quad kernel is right on CUDA"). 1 and
# 0 are the dequantizing kernel's (tiles._dequantize's INT4_DEQUANT; the prefill kernel's is
# INT4_PREFILL_DEQUANT):
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
# The quad kernel's launches at head_dim 128: (BLOCK_N, num_warps, num_stages), programs an SM, register cap
# (ptxas's maxnreg; 0: none). Unbounded it takes ~250 registers, two programs an SM; capped at 168 three fit
# (a few spills, sm_90 offline ptxas). An H100 sweep at ctx 8k, B = 8-64 (docs/benchmarks.md, "int8 / quad
# launches by the last wave's fill"): each batch ran fastest at the split count and cap whose last wave was
# fullest, 4 stages uncapped and 3 capped; 64-key tiles, 8 warps and 256-key tiles all lost.
INT4_QUAD_LAUNCHES: tuple[tuple[tuple[int, int, int], int, int], ...] = (
    ((128, 4, 4), 2, 0), ((128, 4, 3), 3, 168),
)


def quad_launch(programs: int, max_seq_len: int, device: torch.device,
                num_splits: int | None = None) -> tuple[int, tuple[int, int, int], int]:
    """(splits, tiles, register cap) of a quad-kernel decode over `programs` (sequence, KV head) pairs: the
    INT4_QUAD_LAUNCHES entry and split count (or at `num_splits`) of near-best _efficiency, fewest splits
    first, then the first entry; its stages at most one more than a split's tiles."""
    tile_counts = tuple(max(1, -(-max_seq_len // tiles[0])) for tiles, _, _ in INT4_QUAD_LAUNCHES)
    return _fill_launch(INT4_QUAD_LAUNCHES, programs, tile_counts, num_sms(device), num_splits)


def pairs_launch(programs: int, max_seq_len: int, device: torch.device,
                 num_splits: int | None = None) -> tuple[int, tuple[int, int, int]]:
    """(splits, tiles) of an int8 pairs-kernel decode (int8_decode.py): INT8_PAIR_LAUNCHES' 128-key tiles at
    the fewest splits of near-best _efficiency (or at `num_splits`), unless its 64-key tiles fill the SMs
    as well unsplit. An H100 sweep at ctx 8k (docs/benchmarks.md, "int8 KV decode from int16 pairs"): the
    64-key tiles led only unsplit (B = 64: 1.71x the bf16 cache vs 1.62x); split, the 128-key ones won at
    B = 8-32 (B = 32: 1.68x at 3 splits vs 1.49x for 64-key tiles at 2, both a near-full last wave)."""
    tile_counts = tuple(max(1, -(-max_seq_len // tiles[0])) for tiles, _, _ in INT8_PAIR_LAUNCHES)
    return _pairs_launch(programs, tile_counts, num_sms(device), num_splits)


@functools.lru_cache(maxsize=4096)  # keyed by tile counts, as _int8_launch
def _pairs_launch(programs: int, tile_counts: tuple[int, ...], sms: int,
                  num_splits: int | None) -> tuple[int, tuple[int, int, int]]:
    (_, long_per_sm, _), (short, short_per_sm, _) = INT8_PAIR_LAUNCHES
    splits, tiles, _ = _fill_launch(INT8_PAIR_LAUNCHES[:1], programs, tile_counts[:1], sms, num_splits)
    long = _efficiency(programs, tile_counts[0], splits, long_per_sm, sms)
    unsplit = _efficiency(programs, tile_counts[1], 1, short_per_sm, sms)
    if num_splits in (None, 1) and unsplit >= long * (1 - _FILL_TIE):
        return 1, short
    return splits, tiles


@functools.lru_cache(maxsize=4096)  # keyed by tile counts, as _int8_launch
def _fill_launch(entries: tuple, programs: int, tile_counts: tuple[int, ...], sms: int,
                 num_splits: int | None) -> tuple[int, tuple[int, int, int], int]:
    options = {}
    for i, ((_, per_sm, _), n) in enumerate(zip(entries, tile_counts, strict=True)):
        for s in [num_splits] if num_splits else range(1, min(n, _MAX_SPLITS) + 1):
            options[s, i] = _efficiency(programs, n, s, per_sm, sms)
    splits, i = _fewest(options)
    (block_n, warps, stages), _, cap = entries[i]
    # no deeper a pipeline than a split has tiles to fill (H100, B = 1 at ctx 8k, two tiles a split: 3
    # stages 17.2 us, 4 stages 20.3: docs/benchmarks.md, "int8 / quad launches by the last wave's fill")
    per_split = -(-tile_counts[i] // splits)
    return splits, (block_n, warps, min(stages, per_split + 1)), cap


# How int8 KV decode reads its codes (kernel._launch_decode's int8_mode), the first the launch's. INT8_PAIRS
# is int8_decode.py's kernel: the codes load as int16 pairs that two byte permutes make float16 dot operands
# (taken where int8_decode.pairs_fit holds, else INT8_CAST); offline sm_90 its loop is 667 instructions a
# 64-key tile against 3046 for INT8_CAST, the split-K kernel converting every code to the query's dtype. On
# an H100 at ctx 8k: 1.14-1.72x the bf16 cache's speed at B = 1-128 against 0.96-1.56x (docs/benchmarks.md,
# "int8 KV decode from int16 pairs"); the split-K kernel's float16 dots (round 4's INT8_FP16, 1.05-1.43x)
# were deleted then.
INT8_CAST, INT8_PAIRS = 0, 1
INT8_DECODE_MODES: tuple[int, ...] = (INT8_PAIRS, INT8_CAST)
# The pairs kernel's launches at head_dim 128 (pairs_launch): (BLOCK_N, num_warps, num_stages), programs an
# SM, register cap (0: none), as INT4_QUAD_LAUNCHES. On the H100 (Triton 3.6) 128-key tiles at 3 stages took
# 167-168 registers and 72 KB of shared memory (three an SM), 64-key tiles at 4 stages 118-128 and 54 KB
# (four); 8 warps, 2 stages and 256-key tiles all lost in the same sweep (docs/benchmarks.md).
INT8_PAIR_LAUNCHES: tuple[tuple[tuple[int, int, int], int, int], ...] = (
    ((128, 4, 3), 3, 0), ((64, 4, 4), 4, 0),
)


def decode_config(head_dim: int, interpreted: bool, programs: int = 1,
                  device: torch.device | None = None, kv_bits: int = 0) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) of a decode launch of `programs` programs (at head_dim 128 the int8
    cache's and the int4 quad kernel's are int8_launch's and quad_launch's).

    At head_dim 128 a stage holds 32 KB of K/V tiles: two stages fit three programs on an SM, three stages
    two. The launch takes the depth whose last wave is fuller (ties: two): on an H100 that is two stages
    at bs16 (384 programs) and three at bs32 (512 programs), each the faster there (docs/benchmarks.md).
    """
    if interpreted:
        return 16, 1, 1  # the interpreter's cost grows with tile size
    if head_dim > 128:
        return 32, 4, 2
    if kv_bits == 4 and head_dim == 128:
        return INT4_DECODE_TILES
    sms = num_sms(device) if device is not None else 132
    fill2, fill3 = (_last_wave_fill(programs, _programs_per_sm(s), sms) for s in (2, 3))
    return (64, 4, 2) if fill2 >= fill3 else (64, 4, 3)


def preload_first_tile(programs: int, stages: int, device: torch.device) -> bool:
    """Whether decode programs read their first KV tile before the PDL wait: when the launch fits one wave.

    A second wave would park its programs behind the first with their tiles loaded; measured, it loses there
    (docs/benchmarks.md).
    """
    if device.type != "cuda":
        return True  # the interpreter: exercise the path in tests
    return programs <= _programs_per_sm(stages) * num_sms(device)


def prefill_config(head_dim: int, max_query_len: int, interpreted: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the prefill kernel (H100 sweep: 64/64/4/3 led, D=128)."""
    if interpreted:
        return 16, 16, 1, 1
    # Short chunks (speculative verification, small tails) get short row tiles instead of padding to 64.
    rows = max(16, triton.next_power_of_2(max_query_len))
    if head_dim <= 128:
        return min(64, rows), 64, 4, 3
    return min(32, rows), 32, 4, 2
