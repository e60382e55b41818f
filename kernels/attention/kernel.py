"""Triton paged attention: split-K flash-decoding for decode rows, varlen causal prefill for chunks."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from kernels.arrivals import arrival_counters
from kernels.attention.config import (
    INT4_DEQUANT_MODES,
    INT4_PREFILL_DEQUANT,
    INT4_QUADS,
    INT8_DECODE_MODES,
    INT8_PAIRS,
    choose_num_splits,
    decode_config,
    int8_launch,
    merge_in_place,
    pairs_launch,
    prefill_config,
    preload_first_tile,
    quad_launch,
)
from kernels.attention.int4_decode import launch_int4_quads, quads_fit
from kernels.attention.int8_decode import launch_int8_pairs, pairs_fit
from kernels.attention.operands import check_operands, dot_precision, quantized_args
from kernels.attention.tiles import (
    NEG_BIG,
    attend_kv,
    attend_tile,
    block_ids,
    decode_program,
    load_kv,
    merge_splits,
    store_decode,
)
from kernels.pdl import pdl_launch, pdl_release, pdl_wait
from kernels.store_kv.kernel import hadamard_rows

if TYPE_CHECKING:
    from kernels.attention.metadata import AttentionMetadata
    from kernels.store_kv.reference import KVOperand

_LOG2E = 1.4426950408889634


@triton.jit
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_ptr,
    out_ptr, part_acc_ptr, part_ml_ptr, arrivals_ptr,
    scale_log2,
    stride_qt, stride_qh, stride_cb, stride_ct, stride_ch, stride_bt, stride_ot, stride_oh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, MIXED: tl.constexpr,
    MERGE_IN_PLACE: tl.constexpr, BLOCK_S: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr,
    PRELOAD: tl.constexpr,
    k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr,
    stride_ks_slot, stride_ks_h, stride_vs_slot, stride_vs_h,
    KV_BITS: tl.constexpr, K_GROUP: tl.constexpr, V_GROUP: tl.constexpr, HADAMARD: tl.constexpr,
    INT4_DEQUANT: tl.constexpr = 0,
):
    """One program: one sequence, one KV head (all its GROUP query heads packed as dot rows), one KV split.

    MIXED: the batch also holds multi-row chunks (the prefill kernel's); this kernel serves 1-row sequences.
    KV_BITS 8 / 4: a quantized cache (tiles dequantized in registers, int4 ones as INT4_DEQUANT picks; int8
    codes converted to the query's dtype, their row scales folded: the fallback of int8_decode.py's kernel);
    HADAMARD: its rows are stored rotated, so q is rotated the same way and the output rotated back.
    """
    seq, kv_head, split, row, seq_len, live_heads, per_split, start, end, block_row = decode_program(
        query_start_ptr, seq_lens_ptr, block_tables_ptr, stride_bt, GROUP, NUM_SPLITS, BLOCK_N, MIXED)
    first = start  # the first position the loops below attend to
    if PRELOAD:
        # Positions before this step's token were stored by earlier steps: the split's first tile of them is
        # read before waiting for the kernels before this one (which store the newest position and make q).
        pos0 = start + tl.arange(0, BLOCK_N)
        k0, v0 = load_kv(k_cache_ptr, v_cache_ptr, block_row, pos0, kv_head, stride_cb, stride_ct, stride_ch,
                          pos0 < tl.minimum(end, seq_len - 1), HEAD_DIM, BLOCK_D, BLOCK_SIZE, True,
                          k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr, stride_ks_slot, stride_ks_h,
                          stride_vs_slot, stride_vs_h, KV_BITS, K_GROUP, V_GROUP, INT4_DEQUANT)
        first = start + BLOCK_N
    pdl_wait(USE_PDL)  # q and this step's KV come from the kernels before (kernels/pdl.py)
    pdl_release(USE_PDL)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g
    # A split past the end (short context, many splits) reads and writes nothing: the reduce skips it too.
    busy = offs_g < tl.where(start < seq_len, GROUP, 0)  # a bound, not a scalar mask (the interpreter)
    q = tl.load(q_ptr + row.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=busy[:, None] & d_mask[None, :], other=0.0)
    if HADAMARD:  # q·k = (q H)·(k H): score against the keys as stored
        q = hadamard_rows(q.to(tl.float32)).to(q.dtype)

    m_i = tl.full([BLOCK_G], NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    if PRELOAD:
        newest = (pos0 == seq_len - 1) & (pos0 < end)  # stored by the kernel before: read it now
        kn, vn = load_kv(k_cache_ptr, v_cache_ptr, block_row, pos0, kv_head, stride_cb, stride_ct, stride_ch,
                          newest, HEAD_DIM, BLOCK_D, BLOCK_SIZE, True,
                          k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr, stride_ks_slot, stride_ks_h,
                          stride_vs_slot, stride_vs_h, KV_BITS, K_GROUP, V_GROUP, INT4_DEQUANT)
        k0 = tl.where(newest[:, None], kn, k0)
        v0 = tl.where(newest[:, None], vn, v0)
        acc, m_i, l_i = attend_kv(acc, m_i, l_i, q, 0, k0, v0, pos0, pos0 < end, scale_log2, True, False,
                                   DOT_PRECISION)
    # Whole tiles first (no masks), then at most one tile that runs past `end`.
    full_end = first + tl.maximum(end - first, 0) // BLOCK_N * BLOCK_N
    if KV_BITS != 8:  # only int8 reads each tile's block ids a tile ahead: measured on an H100 at ctx 8k,
        # bf16 lost 10% at B = 64 with it (and 2% of a bs-1 step), the dequantized int4 up to 28%, int8 gained
        # 1.02x -> 1.22x the bf16 cache at B = 64 (docs/benchmarks.md)
        for n0 in range(first, full_end, BLOCK_N):
            acc, m_i, l_i = attend_tile(
                acc, m_i, l_i, q, 0, k_cache_ptr, v_cache_ptr, block_row, n0, end, kv_head, stride_cb,
                stride_ct, stride_ch, scale_log2, HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_SIZE, False, False,
                DOT_PRECISION, k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr, stride_ks_slot, stride_ks_h,
                stride_vs_slot, stride_vs_h, KV_BITS, K_GROUP, V_GROUP, INT4_DEQUANT=INT4_DEQUANT)
    else:
        block = block_ids(block_row, first, end, BLOCK_N, BLOCK_SIZE)  # each tile's, a tile ahead
        for n0 in range(first, full_end, BLOCK_N):
            this_block = block
            block = block_ids(block_row, n0 + BLOCK_N, end, BLOCK_N, BLOCK_SIZE)
            acc, m_i, l_i = attend_tile(
                acc, m_i, l_i, q, 0, k_cache_ptr, v_cache_ptr, block_row, n0, end, kv_head, stride_cb,
                stride_ct, stride_ch, scale_log2, HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_SIZE, False, False,
                DOT_PRECISION, k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr, stride_ks_slot, stride_ks_h,
                stride_vs_slot, stride_vs_h, KV_BITS, K_GROUP, V_GROUP, INT4_DEQUANT=INT4_DEQUANT,
                block=this_block)
    for n0 in range(full_end, end, BLOCK_N):
        acc, m_i, l_i = attend_tile(
            acc, m_i, l_i, q, 0, k_cache_ptr, v_cache_ptr, block_row, n0, end, kv_head, stride_cb, stride_ct,
            stride_ch, scale_log2, HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_SIZE, True, False, DOT_PRECISION,
            k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr, stride_ks_slot, stride_ks_h,
            stride_vs_slot, stride_vs_h, KV_BITS, K_GROUP, V_GROUP, INT4_DEQUANT=INT4_DEQUANT)

    if HADAMARD:  # values were stored as v H: the weighted sum comes back by H (H H = I); linear, so before
        acc = hadamard_rows(acc)  # the split merge too
    store_decode(acc, m_i, l_i, out_ptr, part_acc_ptr, part_ml_ptr, arrivals_ptr, seq, kv_head, split, row,
                 seq_len, per_split, offs_g, busy, live_heads, stride_ot, stride_oh, GROUP, HEAD_DIM, BLOCK_D,
                 NUM_SPLITS, MERGE_IN_PLACE, BLOCK_S)


@triton.jit
def _decode_reduce_kernel(
    part_acc_ptr, part_ml_ptr, query_start_ptr, seq_lens_ptr, out_ptr, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr, MIXED: tl.constexpr, USE_PDL: tl.constexpr,
):
    """Merge the split partials of one (sequence, query head) with log-sum-exp weights."""
    pdl_wait(USE_PDL)
    pdl_release(USE_PDL)
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1) + tl.arange(0, 1)
    row = tl.load(query_start_ptr + seq)
    live_heads = 1  # 0 for sequences the prefill kernel serves: nothing stored
    if MIXED:
        live_heads = tl.where(tl.load(query_start_ptr + seq + 1) - row == 1, 1, 0)
    seq_len = tl.load(seq_lens_ptr + seq)
    per_split = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N  # the decode kernel's split bounds
    merge_splits(part_acc_ptr, part_ml_ptr, out_ptr, row, seq_len, per_split,
                  (seq * tl.num_programs(1) + head) * NUM_SPLITS, head, tl.arange(0, 1) < live_heads,
                  stride_ot, stride_oh, HEAD_DIM, BLOCK_D, BLOCK_S)


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_ptr, out_ptr,
    scale_log2,
    stride_qt, stride_qh, stride_cb, stride_ct, stride_ch, stride_bt, stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SKIP_SINGLE_ROWS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr,
    stride_ks_slot, stride_ks_h, stride_vs_slot, stride_vs_h,
    KV_BITS: tl.constexpr, K_GROUP: tl.constexpr, V_GROUP: tl.constexpr, HADAMARD: tl.constexpr,
    tree_mask_ptr, TREE: tl.constexpr, INT4_DEQUANT: tl.constexpr,
):
    """One program: BLOCK_M query rows of one sequence's chunk, one query head. Context from the paged cache.

    SKIP_SINGLE_ROWS: 1-row sequences are left to the decode kernel (which reads their KV once per KV head).
    TREE: tree verification (AttentionMetadata.tree_mask): a row sees the context and the chunk rows its
    int64 mask sets; off, the mask code is not compiled at all.
    """
    m_block = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    mine = m_block * BLOCK_M < q_len
    if SKIP_SINGLE_ROWS:
        mine = mine & (q_len > 1)
    if mine:
        seq_len = tl.load(seq_lens_ptr + seq)
        context_len = seq_len - q_len  # cached tokens before this chunk; query i sits at context_len + i
        kv_head = head // GROUP
        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_mask = offs_m < q_len
        d_mask = offs_d < HEAD_DIM
        rows = (q_start + offs_m).to(tl.int64)
        q = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        if HADAMARD:  # as in the decode kernel
            q = hadamard_rows(q.to(tl.float32)).to(q.dtype)
        q_pos = context_len + offs_m
        block_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
        # Keys before this tile's first query position are visible to every row: whole tiles of those need no
        # mask. The rest, up to the last row's own position, are masked causally.
        first_pos = context_len + m_block * BLOCK_M
        full_end = first_pos // BLOCK_N * BLOCK_N
        kv_end = tl.minimum(seq_len, first_pos + BLOCK_M)
        tree_bits = 0
        if TREE:  # earlier chunk rows are not all ancestors: only the context goes unmasked
            full_end = context_len // BLOCK_N * BLOCK_N
            tree_bits = tl.load(tree_mask_ptr + rows, mask=m_mask, other=0)

        m_i = tl.full([BLOCK_M], NEG_BIG, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for n0 in range(0, full_end, BLOCK_N):
            acc, m_i, l_i = attend_tile(
                acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr, block_row, n0, kv_end, kv_head, stride_cb,
                stride_ct, stride_ch, scale_log2, HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_SIZE, False, False,
                DOT_PRECISION, k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr, stride_ks_slot, stride_ks_h,
                stride_vs_slot, stride_vs_h, KV_BITS, K_GROUP, V_GROUP, INT4_DEQUANT=INT4_DEQUANT)
        for n0 in range(full_end, kv_end, BLOCK_N):
            acc, m_i, l_i = attend_tile(
                acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr, block_row, n0, kv_end, kv_head, stride_cb,
                stride_ct, stride_ch, scale_log2, HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_SIZE, True, True,
                DOT_PRECISION, k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr, stride_ks_slot, stride_ks_h,
                stride_vs_slot, stride_vs_h, KV_BITS, K_GROUP, V_GROUP, tree_bits, context_len, TREE,
                INT4_DEQUANT)

        if HADAMARD:
            acc = hadamard_rows(acc)
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        dst = out_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def _launch_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                   scale: float, out: torch.Tensor, num_splits: int | None, mixed: bool, quant: dict,
                   tiles: tuple[int, int, int] | None = None, int4_dequant: int | None = None,
                   int8_mode: int | None = None, max_registers: int | None = None) -> None:
    num_seqs = meta.seq_lens.shape[0]
    _, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    kv_bits = quant["KV_BITS"]
    int4_dequant = INT4_DEQUANT_MODES[0] if int4_dequant is None else int4_dequant
    quads = kv_bits == 4 and int4_dequant == INT4_QUADS
    if quads and not quads_fit(q, k_cache, quant["K_GROUP"], quant["V_GROUP"]):
        quads, int4_dequant = False, INT4_PREFILL_DEQUANT
    int8_mode = INT8_DECODE_MODES[0] if int8_mode is None else int8_mode
    pairs = kv_bits == 8 and int8_mode == INT8_PAIRS and pairs_fit(q, k_cache)
    block_d = triton.next_power_of_2(head_dim)
    interpreted = q.device.type == "cpu"
    kv_pairs, launch_tiles, quad_cap = num_seqs * num_kv_heads, None, 0
    if quads:
        auto, launch_tiles, quad_cap = quad_launch(kv_pairs, meta.max_seq_len, q.device, num_splits)
    elif pairs:
        auto, launch_tiles = pairs_launch(kv_pairs, meta.max_seq_len, q.device, num_splits)
    elif kv_bits == 8:
        auto, launch_tiles = int8_launch(kv_pairs, meta.max_seq_len, q.device, num_splits)
    else:
        auto = choose_num_splits(num_seqs, num_kv_heads, meta.max_seq_len, q.device, kv_bits)
    num_splits = auto if num_splits is None else num_splits
    programs = kv_pairs * num_splits
    if head_dim == 128 and not interpreted:
        tiles = tiles or launch_tiles
    block_n, warps, stages = tiles or decode_config(head_dim, interpreted, programs, q.device, kv_bits)
    preload = preload_first_tile(programs, stages, q.device)
    if num_splits > 1:
        part_acc = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32,
                               device=q.device)
        part_ml = torch.empty(num_seqs, num_heads, num_splits, 2, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out  # unused: the kernel normalizes and writes `out` directly
    in_place = merge_in_place(num_splits)
    arrivals = out  # unused unless in place
    if in_place:
        arrivals = meta.arrivals
        if arrivals is None or arrivals.numel() < num_seqs * num_kv_heads or arrivals.device != q.device:
            arrivals = arrival_counters(q.device, num_seqs * num_kv_heads)
    grid = (num_seqs, num_kv_heads, num_splits)
    if quads:
        launch_int4_quads(grid, q, k_cache, v_cache, quant, meta, scale * _LOG2E, out, part_acc, part_ml,
                          arrivals, block_n=block_n, num_warps=warps, num_stages=stages, mixed=mixed,
                          merge_in_place=in_place, pdl=pdl_launch(q.device),
                          max_registers=quad_cap if max_registers is None else max_registers)
    elif pairs:
        launch_int8_pairs(grid, q, k_cache, v_cache, quant, meta, scale * _LOG2E, out, part_acc, part_ml,
                          arrivals, block_n=block_n, num_warps=warps, num_stages=stages, mixed=mixed,
                          merge_in_place=in_place, pdl=pdl_launch(q.device))
    else:
        _decode_kernel[grid](
            q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, out, part_acc,
            part_ml, arrivals,
            scale * _LOG2E,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            meta.block_tables.stride(0), out.stride(0), out.stride(1),
            GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_D=block_d,
            BLOCK_SIZE=meta.block_size, BLOCK_N=block_n, NUM_SPLITS=num_splits, MIXED=mixed,
            MERGE_IN_PLACE=in_place, BLOCK_S=triton.next_power_of_2(num_splits), PRELOAD=preload,
            DOT_PRECISION=dot_precision(q.dtype), num_warps=warps, num_stages=stages,
            INT4_DEQUANT=int4_dequant,
            **pdl_launch(q.device), **quant,
        )
    if num_splits > 1 and not in_place:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            part_acc, part_ml, meta.query_start_loc, meta.seq_lens, out, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=block_d, NUM_SPLITS=num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_N=block_n, MIXED=mixed,
            num_warps=1 if interpreted else 4,
            **pdl_launch(q.device),
        )


def _launch_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float, out: torch.Tensor, skip_single_rows: bool, quant: dict) -> None:
    _, num_heads, head_dim = q.shape
    block_m, block_n, warps, stages = prefill_config(head_dim, meta.max_query_len, q.device.type == "cpu")
    grid = (triton.cdiv(meta.max_query_len, block_m), meta.seq_lens.shape[0], num_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, out,
        scale * _LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        meta.block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=num_heads // k_cache.shape[2], HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=meta.block_size, BLOCK_M=block_m, BLOCK_N=block_n, SKIP_SINGLE_ROWS=skip_single_rows,
        DOT_PRECISION=dot_precision(q.dtype), num_warps=warps, num_stages=stages, **quant,
        tree_mask_ptr=meta.tree_mask, TREE=meta.tree_mask is not None, INT4_DEQUANT=INT4_PREFILL_DEQUANT,
    )


def paged_decode_attention(
    q: torch.Tensor, k_cache: KVOperand, v_cache: KVOperand, meta: AttentionMetadata, scale: float,
    num_splits: int | None = None, tiles: tuple[int, int, int] | None = None, int4_dequant: int | None = None,
    int8_mode: int | None = None, max_registers: int | None = None,
) -> torch.Tensor:
    """Decode-only batch (every sequence brings one query row) → [B, Hq, D]. `num_splits` None = auto;
    `tiles` (BLOCK_N, num_warps, num_stages) None = config.decode_config's; `int4_dequant` /
    `int8_mode` / `max_registers` (the int4 quad kernel's register cap, 0 = the compiler's choice) None =
    config.INT4_DEQUANT_MODES[0] / INT8_DECODE_MODES[0] / config.quad_launch's (the bench sweeps
    the others)."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_cache, v_cache, quant = quantized_args(k_cache, v_cache)
    if q.shape[0]:
        _launch_decode(q, k_cache, v_cache, meta, scale, out, num_splits, mixed=False, quant=quant,
                       tiles=tiles, int4_dequant=int4_dequant, int8_mode=int8_mode,
                       max_registers=max_registers)
    return out


def paged_prefill_attention(
    q: torch.Tensor, k_cache: KVOperand, v_cache: KVOperand, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """The prefill kernel alone over any batch (chunks, decodes, mixes) → [T, Hq, D]."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_cache, v_cache, quant = quantized_args(k_cache, v_cache)
    if q.shape[0]:
        _launch_prefill(q, k_cache, v_cache, meta, scale, out, skip_single_rows=False, quant=quant)
    return out


def paged_attention_triton(
    q: torch.Tensor, k_cache: KVOperand, v_cache: KVOperand, meta: AttentionMetadata, scale: float,
) -> torch.Tensor:
    """q [T, Hq, D] → [T, Hq, D], paged_attention_ref's contract; reads only meta's device tensors and ints.

    Decode-only batches run the split-K decode kernel. Other batches run the prefill kernel for multi-row
    chunks and the decode kernel for 1-row sequences beside them (each kernel skips the other's sequences on
    device, so the host never needs to know which is which). Quantized caches (QuantizedKV) are read as
    stored: each tile is dequantized in registers.
    """
    check_operands(q, k_cache, v_cache, meta)
    k_cache, v_cache, quant = quantized_args(k_cache, v_cache)
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.shape[0] == 0:
        return out
    if meta.is_decode_only:
        _launch_decode(q, k_cache, v_cache, meta, scale, out, None, mixed=False, quant=quant)
    else:
        num_seqs = meta.seq_lens.shape[0]
        # T == B * max_query_len means every sequence brings max_query_len > 1 rows: no decode rows to serve.
        has_single_rows = q.shape[0] != num_seqs * meta.max_query_len
        _launch_prefill(q, k_cache, v_cache, meta, scale, out, skip_single_rows=has_single_rows, quant=quant)
        if has_single_rows:
            _launch_decode(q, k_cache, v_cache, meta, scale, out, None, mixed=True, quant=quant)
    return out
