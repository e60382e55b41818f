"""Triton skinny GEMM for decode-sized linears (linear_ref's contract): y [M, N] = x [M, K] · W [N, K]ᵀ.

At decode a linear has a few rows against a weight of tens to hundreds of MB, so its time is the time to
stream W once. Each program owns BLOCK_N whole rows of W (contiguous along K) and walks K in BLOCK_K steps:
  - one row (M = 1): fp32 multiply-adds into a [BLOCK_N, BLOCK_K] accumulator, one reduction at the end (no
    tensor cores: one multiply-add per weight element is far below the SM's rate);
  - up to 16 rows: tl.dot with the weight tile on the left, [BLOCK_N, BLOCK_K] × [BLOCK_K, 16] (tensor
    cores; 16 multiply-adds per weight element would outrun the SM's fp32 units at HBM speed). Weight rows
    go on the left ("swap AB"): the MMA is 64 weight rows tall, as Hopper's wgmma wants, rather than the
    batch padded to 16. With x on the left, PDL slowed these launches down; with W on the left it speeds
    them up (docs/benchmarks.md).
Optionally SPLIT_K programs share a row block, adding fp32 partial sums atomically (for weights with few row
blocks and long rows). Rows past M_MAX rows, or odd layouts, go to cuBLAS: that is the right kernel there.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.activation.kernel import silu_mul_rounded, silu_mul_triton
from kernels.linear.config import SHARED_MEMORY_BUDGET, SKINNY_MAX_M, SkinnyConfig, pick_config
from kernels.pdl import pdl_launch, pdl_release, pdl_wait


@triton.jit
def weight_tile(w_ptrs, n_mask, EVEN_N: tl.constexpr):
    """A [BLOCK_N, BLOCK_K] weight tile; rows past N (a ragged last block) read as zeros.

    Weights are read once a step and never again before the next one: evict_first keeps them from pushing
    the activations, KV and the next kernel's prefetched tiles out of L2 (measured in docs/benchmarks.md).
    """
    if EVEN_N:
        w = tl.load(w_ptrs, eviction_policy="evict_first")
    else:
        w = tl.load(w_ptrs, mask=n_mask, other=0.0, eviction_policy="evict_first")
    return w


@triton.jit
def first_weight_tile(w_ptrs, n_mask, EVEN_N: tl.constexpr, USE_PDL: tl.constexpr):
    """The first weight tile, read before waiting for the kernel before (weights never change), so under PDL
    it streams in while that kernel drains; then this kernel's dependents are released and it waits."""
    w = weight_tile(w_ptrs, n_mask, EVEN_N)
    pdl_release(USE_PDL)
    pdl_wait(USE_PDL)
    return w


@triton.jit
def accumulate_tile(acc, w, x_ptrs, m_mask, K, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    SILU_MUL: tl.constexpr):
    """acc += this K tile's products: w [BLOCK_N, BLOCK_K] against the x tile at x_ptrs."""
    x = tl.load(x_ptrs, mask=m_mask, other=0.0)
    if SILU_MUL:  # rows are [gate | up] (2K wide): the input is silu(gate) · up, rounded as silu_mul_ref
        up = tl.load(x_ptrs + K, mask=m_mask, other=0.0)
        x = silu_mul_rounded(x.to(tl.float32), up.to(tl.float32), up.dtype)
    if USE_DOT:  # x is the transposed tile [BLOCK_K, BLOCK_M]; acc is [BLOCK_N, BLOCK_M]
        acc = tl.dot(w, x, acc, input_precision=DOT_PRECISION)
    else:
        acc += w.to(tl.float32) * x.to(tl.float32)  # x [1, BLOCK_K] broadcasts over the rows of w
    return acc


@triton.jit
def stream_k(acc, w_ptrs, x_ptrs, n_mask, m_mask, K, k_len, BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr,
             USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, SILU_MUL: tl.constexpr,
             USE_PDL: tl.constexpr):
    """acc += the products of k_len columns, BLOCK_K at a time, from the tiles at w_ptrs / x_ptrs.

    The first weight tile is loaded before waiting for the kernel before this one (weights never change), so
    under PDL it streams in while that kernel drains; the other tiles follow in the plain loop.
    """
    w = first_weight_tile(w_ptrs, n_mask, EVEN_N, USE_PDL)
    acc = accumulate_tile(acc, w, x_ptrs, m_mask, K, USE_DOT, DOT_PRECISION, SILU_MUL)
    for _ in range(BLOCK_K, k_len, BLOCK_K):
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        w = weight_tile(w_ptrs, n_mask, EVEN_N)
        acc = accumulate_tile(acc, w, x_ptrs, m_mask, K, USE_DOT, DOT_PRECISION, SILU_MUL)
    return acc


@triton.jit
def first_tiles(x_ptr, w_ptr, offs_m, offs_n, offs_k, k_start, M, N, stride_xm, stride_wn,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr):
    """A program's first K tile (columns k_start + offs_k) of weight rows offs_n and input rows offs_m:
    (w_ptrs, n_mask, x_ptrs, m_mask, a zero accumulator). Under USE_DOT the input tile is transposed,
    [BLOCK_K, BLOCK_M] (the product's right operand), and acc is [BLOCK_N, BLOCK_M]; one row gets a
    [BLOCK_N, BLOCK_K] accumulator, reduced once at the end. Shared with the int8-weight GEMV
    (quant_linear/w8.py)."""
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + (k_start + offs_k)[None, :]
    n_mask = offs_n[:, None] < N
    if USE_DOT:
        x_ptrs = x_ptr + offs_m[None, :] * stride_xm + (k_start + offs_k)[:, None]
        m_mask = offs_m[None, :] < M
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (k_start + offs_k)[None, :]
        m_mask = offs_m[:, None] < M
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    return w_ptrs, n_mask, x_ptrs, m_mask, acc


@triton.jit
def _skinny_gemm_kernel(
    x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    USE_DOT: tl.constexpr, EVEN_N: tl.constexpr, DOT_PRECISION: tl.constexpr, SILU_MUL: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    k_per_split = K // SPLIT_K  # the wrapper guarantees K % (SPLIT_K * BLOCK_K) == 0
    k_start = pid_k * k_per_split
    w_ptrs, n_mask, x_ptrs, m_mask, acc = first_tiles(
        x_ptr, w_ptr, offs_m, offs_n, offs_k, k_start, M, N, stride_xm, stride_wn, BLOCK_M, BLOCK_N, BLOCK_K,
        USE_DOT)
    acc = stream_k(acc, w_ptrs, x_ptrs, n_mask, m_mask, K, k_per_split, BLOCK_K, EVEN_N, USE_DOT,
                   DOT_PRECISION, SILU_MUL, USE_PDL)
    if not USE_DOT:
        acc = tl.sum(acc, axis=1)[:, None]  # [BLOCK_N, 1]
    o_ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]  # acc is [BLOCK_N, BLOCK_M]
    o_mask = (offs_m[None, :] < M) & n_mask
    if SPLIT_K == 1:
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        tl.atomic_add(o_ptrs, acc, mask=o_mask, sem="relaxed")


def supports(x: torch.Tensor, weight: torch.Tensor, config: SkinnyConfig, silu_mul: bool = False) -> bool:
    """Shapes the kernel serves: ≤ SKINNY_MAX_M rows, K a multiple of split × block, dense weight rows."""
    k = weight.shape[1]
    width = 2 * k if silu_mul else k
    return (x.dim() >= 1 and x.shape[-1] == width and x.numel() // width <= SKINNY_MAX_M and x.numel() > 0
            and k % (config.split_k * config.block_k) == 0 and weight.stride(1) == 1
            and x.dtype == weight.dtype and x.dtype in (torch.bfloat16, torch.float16, torch.float32))


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, config: SkinnyConfig,
                  silu_mul: bool = False) -> torch.Tensor:
    """x [..., K] (≤ SKINNY_MAX_M rows), weight [N, K] → [..., N] with this config (no fallback).

    silu_mul: x is [..., 2K] = [gate | up] and the product's input is silu(gate) · up (silu_mul_linear).
    """
    n, k = weight.shape
    rows = x.reshape(-1, 2 * k if silu_mul else k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    use_dot = m > 1
    block_m = 1 if not use_dot else 16
    num_stages = config.num_stages
    per_stage = (block_m * (2 if silu_mul else 1) + config.block_n) * config.block_k * x.element_size()
    while use_dot and num_stages > 1 and num_stages * per_stage > SHARED_MEMORY_BUDGET:
        num_stages -= 1  # fp32 inputs (or the two input tiles of silu_mul) need fewer pipeline stages
    if config.split_k == 1:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    else:
        out = torch.zeros((m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, config.block_n), config.split_k)
    _skinny_gemm_kernel[grid](
        rows, weight, out, m, n, k, rows.stride(0), weight.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_K=config.split_k,
        USE_DOT=use_dot, EVEN_N=n % config.block_n == 0,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # fp32 inputs keep fp32 products
        SILU_MUL=silu_mul, num_warps=config.num_warps, num_stages=num_stages,
        **pdl_launch(x.device),
    )
    if config.split_k > 1:
        out = out.to(x.dtype)
    return out.view(*x.shape[:-1], n)


def linear_triton(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """linear_ref's contract: the skinny GEMM for decode-sized inputs, cuBLAS (F.linear) for the rest."""
    k = weight.shape[1]
    m = x.numel() // k if k else 0
    config = pick_config(m, weight.shape[0], k)
    if not supports(x, weight, config):
        return F.linear(x, weight)
    return skinny_linear(x, weight, config)


def silu_mul_linear_triton(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """silu_mul_linear_ref's contract. One row: the skinny GEMM computes silu(gate) · up as it loads its
    input (no activation round trip, one launch less); more rows: silu_mul, then linear_triton."""
    k = weight.shape[1]
    m = gate_up.numel() // (2 * k) if k else 0
    config = pick_config(m, weight.shape[0], k)
    if m == 1 and supports(gate_up, weight, config, silu_mul=True):
        return skinny_linear(gate_up, weight, config, silu_mul=True)
    # Several rows: the fused prologue slowed the tensor-core path down (H100), so the activation goes first.
    return linear_triton(silu_mul_triton(gate_up), weight)
