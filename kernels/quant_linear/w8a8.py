"""W8A8 in Triton: an int8 × int8 → int32 GEMM whose epilogue applies the per-token and per-channel scales and
writes bf16 (or x's dtype), after the per-token activation quantization of act_quant.py.

int8_gemm: BLOCK_M × BLOCK_N output tiles over [M, K] int8 activations and the [N, K] int8 weight (both
K-major, as Hopper's int8 MMA wants them), tiles swizzled in groups of GROUP_M row blocks so neighbouring
programs share weight tiles in L2; config.tma copies the tiles with tensor descriptors (Hopper's TMA: no
per-thread addresses, no masks) instead of pointer loads.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels.quant_linear.act_quant import quantize_rows
from kernels.quant_linear.config import W8A8_CANDIDATES, QuantConfig
from kernels.quant_linear.layout import W8Weight


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Tile pid's (row block, column block), swizzled in groups of GROUP_M row blocks: neighbouring
    tiles take the same column blocks, so they share weight tiles in L2."""
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * blocks_n
    first_m = (pid // in_group) * GROUP_M
    group_rows = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_rows
    pid_n = (pid % in_group) // group_rows
    return pid_m, pid_n


@triton.jit
def store_scaled(out_ptr, acc, a_scale, b_scale, offs_m, offs_n, M, N, stride_om):
    """The int32 tile times the per-token (rows) and per-channel (columns) scales, stored in out's dtype."""
    y = acc.to(tl.float32) * a_scale[:, None] * b_scale[None, :]
    o_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def store_tile(out_ptr, acc, a_scale_ptr, b_scale_ptr, pid_m, pid_n, M, N, stride_om,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """store_scaled for the output tile (pid_m, pid_n), its scales loaded masked: the TMA epilogue."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    a_scale = tl.load(a_scale_ptr + offs_m, mask=offs_m < M, other=0.0)
    b_scale = tl.load(b_scale_ptr + offs_n, mask=offs_n < N, other=0.0)
    store_scaled(out_ptr, acc, a_scale, b_scale, offs_m, offs_n, M, N, stride_om)


@triton.jit
def _int8_gemm_kernel(
    a_ptr, b_ptr, a_scale_ptr, b_scale_ptr, out_ptr, M, N, K, stride_am, stride_bn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows past M / N clamp to the last one (their products are never stored): no masks on the main loads.
    rows_a = tl.minimum(offs_m, M - 1).to(tl.int64)
    rows_b = tl.minimum(offs_n, N - 1).to(tl.int64)
    a_ptrs = a_ptr + rows_a[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + rows_b[None, :] * stride_bn + offs_k[:, None]  # [BLOCK_K, BLOCK_N], K-major
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(k + offs_k)[None, :] < K, other=0)
            b = tl.load(b_ptrs, mask=(k + offs_k)[:, None] < K, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    a_scale = tl.load(a_scale_ptr + rows_a)
    b_scale = tl.load(b_scale_ptr + rows_b)
    store_scaled(out_ptr, acc, a_scale, b_scale, offs_m, offs_n, M, N, stride_om)


@triton.jit
def _int8_gemm_tma_kernel(
    a_desc, b_desc, a_scale_ptr, b_scale_ptr, out_ptr, M, N, K, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, K, BLOCK_K):  # the tensor-memory engine copies whole tiles, zeros past M, N and K
        a = a_desc.load([pid_m * BLOCK_M, k])
        b = b_desc.load([pid_n * BLOCK_N, k])
        acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
    store_tile(out_ptr, acc, a_scale_ptr, b_scale_ptr, pid_m, pid_n, M, N, stride_om, BLOCK_M, BLOCK_N)


def default_config(q_x: torch.Tensor, weight: W8Weight) -> QuantConfig:
    """The first W8A8 candidate this device and these rows can run: TMA tiles need sm_90+ and 16-byte rows."""
    tma_fits = (q_x.is_cuda and torch.cuda.get_device_capability(q_x.device)[0] >= 9
                and q_x.shape[1] % 16 == 0 and q_x.stride(0) % 16 == 0 and weight.q.stride(0) % 16 == 0)
    return next(c for c in W8A8_CANDIDATES if tma_fits or not c.tma)


def int8_gemm(q_x: torch.Tensor, x_scale: torch.Tensor, weight: W8Weight, out_dtype: torch.dtype,
              config: QuantConfig | None = None) -> torch.Tensor:
    """(int8 [M, K], fp32 scale [M]) × weightᵀ → [M, N] of out_dtype; reference.int8_gemm_ref's contract."""
    m, k = q_x.shape
    n = weight.shape[0]
    config = config or default_config(q_x, weight)
    if q_x.stride(1) != 1 or weight.q.stride(1) != 1:
        raise ValueError("int8_gemm: activation and weight rows must be contiguous along K")
    if config.tma and (k % 16 or q_x.stride(0) % 16 or weight.q.stride(0) % 16):
        raise ValueError(f"int8_gemm: tensor-memory copies need rows of 16-byte multiples, K = {k}")
    out = torch.empty((m, n), dtype=out_dtype, device=q_x.device)
    programs = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    if m and n and config.tma:
        descriptors = (TensorDescriptor.from_tensor(q_x, [config.block_m, config.block_k]),
                       TensorDescriptor.from_tensor(weight.q, [config.block_n, config.block_k]))
        tiles = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                     GROUP_M=config.group_m, num_warps=config.num_warps, num_stages=config.num_stages)
        _int8_gemm_tma_kernel[(programs,)](
            *descriptors, x_scale, weight.scale, out, m, n, k, out.stride(0), **tiles)
    elif m and n:
        _int8_gemm_kernel[(programs,)](
            q_x, weight.q, x_scale, weight.scale, out, m, n, k, q_x.stride(0), weight.q.stride(0),
            out.stride(0), BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            GROUP_M=config.group_m, EVEN_K=k % config.block_k == 0,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
    return out


def w8a8_linear(x: torch.Tensor, weight: W8Weight, inv_smooth: torch.Tensor | None = None,
                config: QuantConfig | None = None, rotation_block: int = 1) -> torch.Tensor:
    """x [..., K] → [..., N] in x's dtype: quantize_rows, then int8_gemm (reference.w8a8_linear_ref)."""
    n, k = weight.shape
    q_x, x_scale = quantize_rows(x.reshape(-1, k), inv_smooth, rotation_block)
    return int8_gemm(q_x, x_scale, weight, x.dtype, config).view(*x.shape[:-1], n)

