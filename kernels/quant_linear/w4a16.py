"""W4A16 in Triton: y [M, N] = x [M, K] · dequant(W4Weight)ᵀ, fp32 accumulation, out in x's dtype.

w4a16_linear launches the first candidate of config.W4_CANDIDATES for the row count that fits the operands:
one row a GEMV of w4a16_gemv (config.words picks its reading of the packed bytes) or w4a16_stationary
(config.stationary: the input's K slice held while rows stream past); 2-16 rows the tensor-core
kernel of w4a16_mma (bf16 / fp16 inputs, groups of 64 or more); what that cannot serve (g32, fp32 inputs)
and prefill-sized row counts the tl.dot kernel here: a program owns BLOCK_N weight rows and walks its share
of K (split-K: SPLIT_K programs per row block add fp32 partial sums atomically), BLOCK_K values a step. The
packed tile is [BLOCK_N, groups, group / 2] bytes, so each group's scale and low load once per step and
broadcast (a per-value gather of them made round 1's M = 16 ten times slower than the weight bytes alone);
the low and high nibbles dequantize (w4a16_gemv.nibble_float: w = 16s·f + (z − 16s), 1.0's bits passed in as
ONE) into the even and odd columns of the tile, in x's dtype, on the left of tl.dot against the input's even
and odd columns transposed, [BLOCK_N, BLOCK_K / 2] × [BLOCK_K / 2, BLOCK_M], as kernels/linear does ("swap
AB"). BLOCK_M = 16 serves decode batches, larger blocks (a grid over input rows) prefill.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.activation.kernel import silu_mul_triton
from kernels.pdl import pdl_launch, pdl_release, pdl_wait
from kernels.quant_linear.common import dot_precision, grid, outputs, rows_of, store_rows, tile_start
from kernels.quant_linear.config import W4_CANDIDATES, QuantConfig, pick
from kernels.quant_linear.layout import W4Weight
from kernels.quant_linear.w4a16_gemv import _w4a16_gemv_bytes_kernel, _w4a16_gemv_words_kernel, nibble_float
from kernels.quant_linear.w4a16_mma import mma_fits, w4a16_mma
from kernels.quant_linear.w4a16_stationary import stationary_fits, stationary_split, w4a16_stationary

ONE_BITS = 0x3F800000  # 1.0f's bits, a kernel argument so that mask-and-or stays one LOP3 (w4a16_gemv)


@triton.jit
def _w4a16_dot_kernel(
    x_ptr, p_ptr, s_ptr, z_ptr, out_ptr, M, N, K, stride_xm, stride_pn, stride_sn, stride_om,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, ONE, EVEN_N: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr,
):
    HALF_K: tl.constexpr = BLOCK_K // 2
    SPAN: tl.constexpr = GROUP if GROUP < BLOCK_K else BLOCK_K  # values of one group within a tile
    SPANS: tl.constexpr = BLOCK_K // SPAN
    offs_n, offs_m, k_start, k_per_split = tile_start(BLOCK_N, BLOCK_M, BLOCK_K, SPLIT_K, K)
    offs_g = tl.arange(0, SPANS)
    offs_b = tl.arange(0, HALF_K)
    byte = offs_g[:, None] * (SPAN // 2) + tl.arange(0, SPAN // 2)[None, :]  # [SPANS, SPAN / 2]
    n_mask = offs_n[:, None] < N
    rows = offs_n[:, None].to(tl.int64)
    p_row = p_ptr + rows[:, :, None] * stride_pn
    s_row = s_ptr + rows * stride_sn
    z_row = z_ptr + rows * stride_sn
    # input tiles transposed, [HALF_K, BLOCK_M]: the product's right operand
    x_even = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm + 2 * offs_b[:, None]
    m_mask = offs_m[None, :] < M
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    pdl_release(USE_PDL)  # the pipelined loop's prologue reads the input: wait first (kernels/pdl.py)
    pdl_wait(USE_PDL)
    for step in range(0, k_per_split, BLOCK_K):
        k = tl.multiple_of(k_start + step, BLOCK_K)  # lets the weight copies vectorize to 16 B
        p_ptrs = p_row + (k // 2 + byte)[None, :, :]
        g = ((k + offs_g * SPAN) // GROUP)[None, :]
        if EVEN_N:
            p = tl.load(p_ptrs, eviction_policy="evict_first")
            s = tl.load(s_row + g).to(tl.float32)
            z = tl.load(z_row + g).to(tl.float32)
        else:
            p = tl.load(p_ptrs, mask=n_mask[:, :, None], other=0, eviction_policy="evict_first")
            s = tl.load(s_row + g, mask=n_mask, other=0.0).to(tl.float32)
            z = tl.load(z_row + g, mask=n_mask, other=0.0).to(tl.float32)
        xe = tl.load(x_even + k, mask=m_mask, other=0.0)
        xo = tl.load(x_even + k + 1, mask=m_mask, other=0.0)
        s16 = (16.0 * s)[:, :, None]
        low = (z - 16.0 * s)[:, :, None]
        p = p.to(tl.int32)
        we = tl.reshape(nibble_float(p, 0, ONE) * s16 + low, (BLOCK_N, HALF_K))
        wo = tl.reshape(nibble_float(p, 4, ONE) * s16 + low, (BLOCK_N, HALF_K))
        acc = tl.dot(we.to(xe.dtype), xe, acc, input_precision=DOT_PRECISION)
        acc = tl.dot(wo.to(xo.dtype), xo, acc, input_precision=DOT_PRECISION)
    store_rows(out_ptr, acc, offs_m, offs_n, M, N, stride_om, SPLIT_K)


def _reads_words(rows: torch.Tensor, weight: W4Weight, config: QuantConfig) -> bool:
    """The int32-word GEMV needs a bf16 input and packed rows whose bytes view as aligned int32 words."""
    p = weight.packed
    return (config.words and rows.dtype == torch.bfloat16 and rows.storage_offset() % 2 == 0
            and p.stride(0) % 4 == 0 and p.shape[1] % 4 == 0 and p.data_ptr() % 4 == 0
            and weight.group_size % 8 == 0)


def no_fit(rows: torch.Tensor, weight: W4Weight, config: QuantConfig) -> str:
    """Why `config` cannot run this product ('' when it can)."""
    n, k = weight.shape
    m = rows.shape[0]
    if k % (config.split_k * config.block_k) or config.block_k % 2 or weight.group_size % 2:
        return f"K = {k} is no multiple of split {config.split_k} × block {config.block_k}"
    if weight.scale.stride() != weight.low.stride() or weight.packed.stride(1) != 1:
        return "packed rows must be contiguous and scale / low laid out alike"
    if config.mma:
        return mma_fits(rows, weight, config)
    if config.stationary:
        return stationary_fits(rows, weight, config)
    gemv = config.block_m == 1
    if gemv != (m == 1) or gemv and config.block_k % weight.group_size:
        return f"{m} rows, groups of {weight.group_size}"
    if config.partials and not gemv:
        return "split partials serve the GEMV and the tensor-core kernel"
    return ""


def _config(rows: torch.Tensor, weight: W4Weight, config: QuantConfig | None) -> QuantConfig:
    """`config`, or the first candidate of the rows' bucket that fits; ValueError naming why not."""
    n, k = weight.shape
    config = config or pick(W4_CANDIDATES, rows.shape[0], n, k, lambda c: not no_fit(rows, weight, c))
    reason = no_fit(rows, weight, config)
    if reason:
        raise ValueError(f"W4A16: no fit for {config}: {reason}")
    return config


def _launch_options(weight: W4Weight, config: QuantConfig, device: torch.device) -> dict:
    n = weight.shape[0]
    return dict(GROUP=weight.group_size, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                SPLIT_K=config.split_k, ONE=ONE_BITS, EVEN_N=n % config.block_n == 0,
                num_warps=config.num_warps, num_stages=config.num_stages, **pdl_launch(device))


def _stationary(rows: torch.Tensor, weight: W4Weight, config: QuantConfig, like: torch.Tensor,
                silu_mul: bool) -> torch.Tensor:
    config = stationary_split(config, weight.shape[1])
    buffers = outputs(1, weight.shape[0], like, config)
    w4a16_stationary(rows, weight, config, buffers, _launch_options(weight, config, like.device), silu_mul)
    return buffers.result(like, weight.shape[0])


def silu_mul_w4a16_linear(gate_up: torch.Tensor, weight: W4Weight,
                          config: QuantConfig | None = None) -> torch.Tensor:
    """The MLP's down projection fed gate_up [..., 2K]: w4a16_linear of silu(gate) · up, [..., N]. Where
    the pick is the stationary GEMV (one bf16 row) it computes silu(gate) · up in its prologue, for its own
    K slice (one kernel, no activation round trip); otherwise the activation kernel runs first."""
    n, k = weight.shape
    rows = rows_of(gate_up, 2 * k)
    config = _config(rows, weight, config)
    if config.stationary:
        return _stationary(rows, weight, config, gate_up, silu_mul=True)
    return w4a16_linear(silu_mul_triton(gate_up), weight, config)


def w4a16_linear(x: torch.Tensor, weight: W4Weight, config: QuantConfig | None = None) -> torch.Tensor:
    """x [..., K] (bf16, fp16 or fp32) → [..., N] in x's dtype; config None: the first candidate of its row
    bucket (config.W4_CANDIDATES) that fits.

    config.mma takes the tensor-core kernel (w4a16_mma: bf16 / fp16 inputs, block_k dividing the group
    size); otherwise one row takes a GEMV kernel (config.block_m == 1, block_k a multiple of the group size;
    config.words reads int32 words where the input is bf16 and the rows align, bytes otherwise), more rows
    the tl.dot kernel (block_m >= 16). config.partials: split-K merged in place by the last split."""
    n, k = weight.shape
    rows = rows_of(x, k)
    m = rows.shape[0]
    config = _config(rows, weight, config)
    if config.stationary:
        return _stationary(rows, weight, config, x, silu_mul=False)
    gemv = config.block_m == 1
    buffers = outputs(m, n, x, config)
    out, part, arrivals = buffers.out, buffers.part, buffers.arrivals
    common = _launch_options(weight, config, x.device)
    if gemv and _reads_words(rows, weight, config):
        _w4a16_gemv_words_kernel[grid(m, n, config)[:2]](
            rows.view(torch.int32), weight.packed.view(torch.int32), weight.scale, weight.low, out, part,
            arrivals, n, k, weight.packed.stride(0) // 4, weight.scale.stride(0), MERGE=buffers.merge,
            **common)
    elif gemv:
        pairs = rows.dtype == torch.bfloat16 and rows.storage_offset() % 2 == 0
        _w4a16_gemv_bytes_kernel[grid(m, n, config)[:2]](
            rows.view(torch.int32) if pairs else rows, weight.packed, weight.scale, weight.low, out, part,
            arrivals, n, k, weight.packed.stride(0), weight.scale.stride(0), BF16_PAIRS=pairs,
            MERGE=buffers.merge, **common)
    elif m and config.mma:
        w4a16_mma(rows, weight, config, buffers, grid(m, n, config))
    elif m:
        _w4a16_dot_kernel[grid(m, n, config)](
            rows, weight.packed, weight.scale, weight.low, out, m, n, k, rows.stride(0),
            weight.packed.stride(0), weight.scale.stride(0), out.stride(0), BLOCK_M=config.block_m,
            DOT_PRECISION=dot_precision(x.dtype), **common)
    return buffers.result(x, n)
