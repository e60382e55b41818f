"""What the weight-streaming quantized kernels share: exact int → fp32, the output store, launch helpers."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.arrivals import arrival_counters
from kernels.quant_linear.config import QuantConfig


@triton.jit
def exact_float(i):
    """Integers 0 ≤ i < 2^23 → float32, exactly, without a conversion instruction.

    OR-ing i into the mantissa of 2^23 gives the float 2^23 + i; subtracting 2^23 leaves i. An integer op
    and a float add instead of an int → float conversion, a quarter-rate instruction on Hopper: at HBM speed
    an int4 GEMV converts ~7 · 10^12 values a second, about all the conversion units manage.
    """
    return (i.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def tile_start(BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, K):
    """This program's weight rows and input rows (program ids 0 and 2), and its split's first K value and
    length (program id 1; the launcher guarantees K % (SPLIT_K * BLOCK_K) == 0): (offs_n, offs_m, k_start,
    k_len). k_start carries BLOCK_K's divisibility so that the weight copies vectorize to 16 B."""
    k_len = K // SPLIT_K
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    return offs_n, offs_m, tl.multiple_of(tl.program_id(1) * k_len, BLOCK_K), k_len


@triton.jit
def store_rows(out_ptr, acc, offs_m, offs_n, M, N, stride_om, SPLIT_K: tl.constexpr,
               MERGE: tl.constexpr = False, part_ptr=None, arrivals_ptr=None):
    """acc [BLOCK_N, BLOCK_M] (weight rows × input rows) into out [M, N]: stored, or under split-K added
    into fp32 zeros atomically, or (MERGE) merged in place: each split stores its fp32 tile in part
    [SPLIT_K, M, N] and counts in at its tile's arrival counter (kernels/arrivals.py; tiles numbered
    program_id(2) · num_programs(0) + program_id(0)); the last split to arrive resets the counter, adds the
    tiles and stores out in its dtype — one launch, no zeroed buffer, no cast afterwards."""
    o_mask = (offs_m[None, :] < M) & (offs_n[:, None] < N)
    if SPLIT_K == 1:
        tl.store(out_ptr + offs_m[None, :] * stride_om + offs_n[:, None], acc.to(out_ptr.dtype.element_ty),
                 mask=o_mask)
    elif MERGE:
        tile = offs_m[None, :].to(tl.int64) * N + offs_n[:, None]
        tl.store(part_ptr + tl.program_id(1).to(tl.int64) * M * N + tile, acc, mask=o_mask)
        # the barrier + acq_rel atomic publish this program's tile before its arrival counts, and make the
        # other splits' visible to the merging program (as kernels/attention's in-place merge)
        tl.debug_barrier()
        arrival = arrivals_ptr + tl.program_id(2) * tl.num_programs(0) + tl.program_id(0)
        if tl.atomic_add(arrival, 1, sem="acq_rel") == SPLIT_K - 1:
            tl.atomic_xchg(arrival, 0, sem="relaxed")
            total = tl.load(part_ptr + tile, mask=o_mask, other=0.0)
            for split in tl.static_range(1, SPLIT_K):
                total += tl.load(part_ptr + split * M * N + tile, mask=o_mask, other=0.0)
            tl.store(out_ptr + offs_m[None, :] * stride_om + offs_n[:, None],
                     total.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        tl.atomic_add(out_ptr + offs_m[None, :] * stride_om + offs_n[:, None], acc, mask=o_mask,
                      sem="relaxed")


@dataclass(frozen=True)
class SplitOutput:
    """The buffers of one launch: out [M, N] (x's dtype, or fp32 zeros that atomic split-K programs add
    into, cast by result()), and for an in-place merge the fp32 tiles [SPLIT_K, M, N] and arrival counters
    (otherwise both out, unused)."""

    out: torch.Tensor
    part: torch.Tensor
    arrivals: torch.Tensor
    merge: bool

    def result(self, like: torch.Tensor, n: int) -> torch.Tensor:
        return self.out.to(like.dtype).view(*like.shape[:-1], n)


def rows_of(x: torch.Tensor, k: int) -> torch.Tensor:
    """x [..., K] as a [M, K] matrix with unit column stride."""
    rows = x.reshape(-1, k)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def outputs(m: int, n: int, like: torch.Tensor, config: QuantConfig) -> SplitOutput:
    """The product's buffers for this config (config.partials with split-K: merged in place)."""
    if config.split_k == 1 or config.partials:
        out = torch.empty((m, n), dtype=like.dtype, device=like.device)
        if config.split_k == 1:
            return SplitOutput(out, out, out, False)
        part = torch.empty((config.split_k, m, n), dtype=torch.float32, device=like.device)
        tiles = triton.cdiv(n, config.block_n) * triton.cdiv(m, config.block_m)
        return SplitOutput(out, part, arrival_counters(like.device, tiles), True)
    out = torch.zeros((m, n), dtype=torch.float32, device=like.device)
    return SplitOutput(out, out, out, False)


def grid(m: int, n: int, config: QuantConfig) -> tuple[int, int, int]:
    """(row blocks of the weight, K splits, blocks of input rows)."""
    return triton.cdiv(n, config.block_n), config.split_k, triton.cdiv(m, config.block_m)


def dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs (CPU tests) keep fp32 products
