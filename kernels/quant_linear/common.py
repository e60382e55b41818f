"""What the weight-streaming quantized kernels share: exact int → fp32, the output store, launch helpers."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

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
def store_rows(out_ptr, acc, offs_m, offs_n, M, N, stride_om, SPLIT_K: tl.constexpr,
               PARTIALS: tl.constexpr = False):
    """acc [BLOCK_N, BLOCK_M] (weight rows × input rows) into out [M, N]: stored, or added under split-K.
    PARTIALS (split-K, out [SPLIT_K, M, N] dense): each split stores its own slice for sum_splits, so the
    buffer needs no zeroing and no atomics."""
    o_ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
    o_mask = (offs_m[None, :] < M) & (offs_n[:, None] < N)
    if SPLIT_K == 1:
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_mask)
    elif PARTIALS:
        tl.store(o_ptrs + tl.program_id(1).to(tl.int64) * M * N, acc, mask=o_mask)
    else:
        tl.atomic_add(o_ptrs, acc, mask=o_mask, sem="relaxed")


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, size, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < size
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for split in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + split * size + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def sum_splits(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 split partials [S, M, N] (store_rows' PARTIALS) → their sum [M, N] in dtype, one small kernel."""
    splits, m, n = partials.shape
    out = torch.empty((m, n), dtype=dtype, device=partials.device)
    block = 1024 if partials.is_cuda else 64  # the interpreter's cost grows with the block
    if m * n:
        _sum_splits_kernel[(triton.cdiv(m * n, block),)](partials, out, m * n, SPLIT_K=splits, BLOCK=block,
                                                           num_warps=4)
    return out


def rows_of(x: torch.Tensor, k: int) -> torch.Tensor:
    """x [..., K] as a [M, K] matrix with unit column stride."""
    rows = x.reshape(-1, k)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def output(m: int, n: int, like: torch.Tensor, config: QuantConfig, partials: bool = False) -> torch.Tensor:
    """The product's buffer: x's dtype, or fp32 zeros that split-K programs add into, or (partials) one
    uninitialized fp32 [M, N] slice a split (store_rows' PARTIALS)."""
    if config.split_k == 1:
        return torch.empty((m, n), dtype=like.dtype, device=like.device)
    if partials:
        return torch.empty((config.split_k, m, n), dtype=torch.float32, device=like.device)
    return torch.zeros((m, n), dtype=torch.float32, device=like.device)


def grid(m: int, n: int, config: QuantConfig) -> tuple[int, int, int]:
    """(row blocks of the weight, K splits, blocks of input rows)."""
    return triton.cdiv(n, config.block_n), config.split_k, triton.cdiv(m, config.block_m)


def dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs (CPU tests) keep fp32 products
