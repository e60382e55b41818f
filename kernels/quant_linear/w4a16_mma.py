"""W4A16 on tensor cores for any number of rows, M = 1 included: y [M, N] = x [M, K] · dequant(W4Weight)ᵀ.

The GEMVs of w4a16_gemv issue several instructions a weight value and keep too few loads in flight: Triton
pipelines (cp.async into shared memory, num_stages deep) only the loads that feed a tl.dot. Here the
weights feed one, "swap AB": a program owns BLOCK_N weight rows as the left operand against BLOCK_M input
rows (one decode row padded to an MMA tile costs no bandwidth: masked rows load nothing).

Dequantization is one shift-or-mask a value, no multiply:
  - the packed bytes load as int16 "quads", nibble j of quad i being value 4i + j of the row (the layout's
    bytes, little-endian), and the input as int64 quads alike; splitting both into their four nibble /
    value positions gives four products [BLOCK_N, BLOCK_K/4] · [BLOCK_K/4, BLOCK_M] that sum to the tile's;
  - a nibble q OR-ed into the mantissa of BASE (128 in bf16, 1024 in fp16: where the spacing of floats is
    1) is the float BASE + q exactly. Two quads sit in one 32-bit register (the MMA operand layout gives a
    thread neighbouring pairs), so one LOP3 makes two values and one shift serves two (quads, inline PTX);
  - the group's affine stays out of the product: w = s·q + z, so per group
    Σ w·x = s · Σ (BASE + q)·x + (z − BASE·s) · Σ x, on fp32 MMA sums.
Every step's BLOCK_K values lie in one group (BLOCK_K divides the group size), so a step's products take
its scale and low once per row. Split-K (SPLIT_K programs per row block) adds fp32 partials as common.py
does. The Triton interpreter runs no PTX: there quads takes the same bits apart with plain integer ops.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.nibbles import MAGIC, quads, quarters
from kernels.pdl import pdl_launch, pdl_release, pdl_wait
from kernels.quant_linear.common import SplitOutput, store_rows, tile_start
from kernels.quant_linear.config import QuantConfig
from kernels.quant_linear.layout import W4Weight


@triton.jit
def _w4a16_mma_kernel(
    x_ptr, h_ptr, s_ptr, z_ptr, out_ptr, part_ptr, arrivals_ptr, M, N, K, stride_xm, stride_hn, stride_sn,
    stride_om,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, EVEN_N: tl.constexpr, MAGIC_BITS: tl.constexpr, BASE: tl.constexpr,
    PTX: tl.constexpr, MERGE: tl.constexpr, USE_PDL: tl.constexpr,
):
    """x_ptr: the input as int64 quads [M, K / 4]; h_ptr: the packed weight as int16 quads [N, K / 4]."""
    Q: tl.constexpr = BLOCK_K // 4
    DTYPE: tl.constexpr = tl.bfloat16 if MAGIC_BITS == 0x4300 else tl.float16
    offs_n, offs_m, k_start, k_per_split = tile_start(BLOCK_N, BLOCK_M, BLOCK_K, SPLIT_K, K)
    offs_q = tl.arange(0, Q)
    n_mask = offs_n < N
    rows = offs_n.to(tl.int64)
    h_ptrs = h_ptr + rows[:, None] * stride_hn + (k_start // 4 + offs_q)[None, :]
    s_row = s_ptr + rows * stride_sn
    z_row = z_ptr + rows * stride_sn
    # the input tile transposed, [Q, BLOCK_M]: the products' right operand
    x_ptrs = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm + k_start // 4 + offs_q[:, None]
    m_mask = offs_m[None, :] < M
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    pdl_release(USE_PDL)  # the pipelined loop's prologue reads the input: wait first (kernels/pdl.py)
    pdl_wait(USE_PDL)
    for step in range(0, k_per_split, BLOCK_K):
        g = (k_start + step) // GROUP
        if EVEN_N:  # weights are read once: evict_first keeps them from pushing the input out of L2
            h = tl.load(h_ptrs, eviction_policy="evict_first")
            s = tl.load(s_row + g).to(tl.float32)
            z = tl.load(z_row + g).to(tl.float32)
        else:
            h = tl.load(h_ptrs, mask=n_mask[:, None], other=0, eviction_policy="evict_first")
            s = tl.load(s_row + g, mask=n_mask, other=0.0).to(tl.float32)
            z = tl.load(z_row + g, mask=n_mask, other=0.0).to(tl.float32)
        x0, x1, x2, x3 = quarters(tl.load(x_ptrs, mask=m_mask, other=0), DTYPE)
        x_sum = tl.sum((x0.to(tl.float32) + x1.to(tl.float32)) + (x2.to(tl.float32) + x3.to(tl.float32)), 0)
        t0, t1, t2, t3 = quads(h, MAGIC_BITS, DTYPE, PTX)
        d = tl.dot(t0, x0)
        d = tl.dot(t1, x1, d)
        d = tl.dot(t2, x2, d)
        d = tl.dot(t3, x3, d)
        acc += d * s[:, None] + (z - BASE * s)[:, None] * x_sum[None, :]
        h_ptrs += Q
        x_ptrs += Q
    store_rows(out_ptr, acc, offs_m, offs_n, M, N, stride_om, SPLIT_K, MERGE, part_ptr, arrivals_ptr)


def mma_fits(rows: torch.Tensor, weight: W4Weight, config: QuantConfig) -> str:
    """Why this kernel cannot take these operands ('' when it can)."""
    p = weight.packed
    if rows.dtype not in MAGIC:
        return f"the tensor-core W4A16 takes bf16 or fp16 inputs, not {rows.dtype}"
    if weight.group_size % config.block_k or config.block_k < 64 or config.block_m < 8:
        return (f"block_k {config.block_k} must divide the group size {weight.group_size} and be >= 64, "
                f"block_m >= 8")
    if rows.shape[1] % 4 or rows.stride(0) % 4 or rows.storage_offset() % 4 or rows.data_ptr() % 8:
        return "the input rows must view as 8-byte-aligned int64 quads"
    if p.stride(0) % 2 or p.shape[1] % 2 or p.storage_offset() % 2 or p.data_ptr() % 2:
        return "the packed rows must view as aligned int16 quads"
    return ""


def w4a16_mma(rows: torch.Tensor, weight: W4Weight, config: QuantConfig, out: SplitOutput,
              grid: tuple[int, int, int], ptx: bool | None = None) -> None:
    """Launches the kernel over rows [M, K] into out (common.outputs' buffers for this config); ptx: the
    inline-PTX dequantization (default: on CUDA; the interpreter runs none)."""
    n, k = weight.shape
    magic_bits, base = MAGIC[rows.dtype]
    _w4a16_mma_kernel[grid](
        rows.view(torch.int64), weight.packed.view(torch.int16), weight.scale, weight.low, out.out, out.part,
        out.arrivals, rows.shape[0], n, k, rows.stride(0) // 4, weight.packed.stride(0) // 2,
        weight.scale.stride(0), out.out.stride(0),
        GROUP=weight.group_size, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        SPLIT_K=config.split_k, EVEN_N=n % config.block_n == 0, MAGIC_BITS=magic_bits, BASE=base,
        PTX=rows.is_cuda if ptx is None else ptx, MERGE=out.merge, num_warps=config.num_warps,
        num_stages=config.num_stages, **pdl_launch(rows.device))
