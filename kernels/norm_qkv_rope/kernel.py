"""Triton norm + qkv projection + rotary + KV store (rms_norm_qkv_rotary_store_ref's contract), by row count.

One decode row: one kernel whose programs each recompute the row's RMSNorm (kernels/norm_linear), stream
their qkv weight rows and rotate and store their columns. 2..16 rows: the norm, then the qkv GEMM with rotary
and the KV store in its epilogue (qkv_rope.py). More: norm + GEMM, then the rotary + KV store kernel. Every
KV write goes through kernels/store_kv's `store_kv_values`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.norm_linear.kernel import (
    BLOCK_K,
    NUM_WARPS,
    norm_linear_supported,
    normed_tile,
    rms_norm_linear_triton,
    row_rstd,
)
from kernels.norm_qkv_rope.qkv_rope import qkv_rope_supported, qkv_rotary_store
from kernels.pdl import pdl_launch, pdl_release, pdl_wait
from kernels.rmsnorm.kernel import rms_norm_and_residual_triton
from kernels.rotary.kernel import rotary_store_kv_triton
from kernels.store_kv.kernel import store_kv_values
from kernels.store_kv.quant import QuantizedKV
from kernels.store_kv.reference import KVOperand


@triton.jit
def _norm_qkv_rope_kernel(
    x_ptr, res_ptr, norm_w_ptr, w_ptr, q_out_ptr, res_out_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr,
    slot_ptr, K, stride_wn, eps, stride_kc_slot, stride_kc_h, stride_vc_slot, stride_vc_h,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_RES: tl.constexpr,
    BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr,
):
    """The qkv projection of one decode row with its RMSNorm before and rotary + KV store after.

    A program owns output columns (j, j+1, j+D/2, j+D/2+1) of one head: both halves of the rotary pairs it
    needs. q columns leave rotated, k columns go rotated into the cache slot, v columns as they are.
    """
    HALF: tl.constexpr = HEAD_DIM // 2
    pid = tl.program_id(0)
    head = pid // (HALF // 2)
    j = (pid % (HALF // 2)) * 2
    a = tl.arange(0, 4)
    col = j + (a % 2) + (a // 2) * HALF  # [j, j+1, j+HALF, j+HALF+1]
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + (head * HEAD_DIM + col)[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    w = tl.load(w_ptrs, eviction_policy="evict_first")  # as weight_tile
    pdl_release(USE_PDL)
    pdl_wait(USE_PDL)
    rstd = row_rstd(x_ptr, res_ptr, res_out_ptr, K, eps, pid, offs_k, HAS_RES, BLOCK_K)
    acc = tl.zeros([4, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if k0 > 0:
            w_ptrs += BLOCK_K
            w = tl.load(w_ptrs, eviction_policy="evict_first")
        acc += w.to(tl.float32) * normed_tile(x_ptr, res_ptr, norm_w_ptr, k0 + offs_k, rstd, HAS_RES)[None, :]
    # The projection's output is rounded to the activation dtype, as the unfused path stores it.
    out = tl.sum(acc, axis=1).to(w.dtype).to(tl.float32)
    x1, x2 = tl.split(tl.permute(tl.reshape(out, (2, 2)), (1, 0)))  # first-half pair, second-half pair
    pair = j + tl.arange(0, 2)
    cos = tl.load(cos_ptr + pair).to(tl.float32)
    sin = tl.load(sin_ptr + pair).to(tl.float32)
    rotated = tl.reshape(tl.permute(tl.join(x1 * cos - x2 * sin, x2 * cos + x1 * sin), (1, 0)), (4,))
    slot = tl.load(slot_ptr).to(tl.int64)
    if head < NUM_Q_HEADS:
        tl.store(q_out_ptr + head * HEAD_DIM + col, rotated.to(q_out_ptr.dtype.element_ty))
    elif slot >= 0:  # a negative slot is a padding row: it stores no KV
        if head < NUM_Q_HEADS + NUM_KV_HEADS:
            store_kv_values(k_cache_ptr, slot, head - NUM_Q_HEADS, col, rotated, None, stride_kc_slot,
                            stride_kc_h)
        else:
            store_kv_values(v_cache_ptr, slot, head - NUM_Q_HEADS - NUM_KV_HEADS, col, out, None,
                            stride_vc_slot, stride_vc_h)


def norm_qkv_rope_supported(x: torch.Tensor, norm_weight: torch.Tensor, weight: torch.Tensor,
                            residual: torch.Tensor | None, head_dim: int, block_k: int = BLOCK_K) -> bool:
    """norm_linear_supported, and heads whose halves split into column pairs."""
    return (norm_linear_supported(x, norm_weight, weight, residual, block_k) and head_dim % 4 == 0
            and weight.shape[0] % head_dim == 0)


def fused_rms_norm_qkv_rotary_store(
    x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
    weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor, num_heads: int, block_k: int = BLOCK_K,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode row: (rotated q [1, Hq, D], x + residual); rotated k and v written to slot_mapping[0]."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    if not all(t.is_contiguous() for t in (k_cache, v_cache, cos, sin)):
        raise ValueError("rms_norm_qkv_rotary_store: caches and rope tables must be contiguous")
    q = torch.empty((1, num_heads, head_dim), dtype=x.dtype, device=x.device)
    new_residual = torch.empty_like(x) if residual is not None else x
    grid = ((num_heads + 2 * num_kv_heads) * head_dim // 4,)
    _norm_qkv_rope_kernel[grid](
        x, residual if residual is not None else x, norm_weight, weight, q, new_residual, cos, sin, k_cache,
        v_cache, slot_mapping, x.shape[-1], weight.stride(0), eps, k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(1), v_cache.stride(2), NUM_Q_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim, HAS_RES=residual is not None, BLOCK_K=block_k,
        num_warps=NUM_WARPS if x.is_cuda else 1, **pdl_launch(x.device),
    )
    return q, new_residual


def rms_norm_qkv_rotary_store_triton(
    x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
    weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: KVOperand, v_cache: KVOperand,
    slot_mapping: torch.Tensor, num_heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """rms_norm_qkv_rotary_store_ref's contract: one kernel for one decode row; the norm, then the qkv GEMM
    with rotary + KV store in its epilogue for up to SKINNY_MAX_M rows; otherwise the norm + GEMM path, then
    the fused rotary + KV store kernel."""
    head_dim = k_cache.shape[3]
    # Quantized caches take the unfused path: these epilogues hold a few columns of a row, not the whole row
    # a scale covers.
    quantized = isinstance(k_cache, QuantizedKV)
    if (not quantized and x.numel() == x.shape[-1] and slot_mapping.numel() == 1
            and norm_qkv_rope_supported(x, norm_weight, weight, residual, head_dim)):
        return fused_rms_norm_qkv_rotary_store(x, residual, norm_weight, eps, weight, cos, sin, k_cache,
                                               v_cache, slot_mapping, num_heads)
    if not quantized and qkv_rope_supported(x, weight, cos, sin, k_cache, v_cache, num_heads):
        h, new_residual = rms_norm_and_residual_triton(x, norm_weight, eps, residual)
        q = qkv_rotary_store(h, weight, cos, sin, k_cache, v_cache, slot_mapping, num_heads)
        return q, new_residual

    qkv, new_residual = rms_norm_linear_triton(x, residual, norm_weight, eps, weight)
    num_kv_heads = k_cache.shape[2]
    heads = qkv.view(qkv.shape[0], num_heads + 2 * num_kv_heads, head_dim)
    q, k, v = heads.split_with_sizes([num_heads, num_kv_heads, num_kv_heads], dim=1)
    return rotary_store_kv_triton(q, k, v, cos, sin, k_cache, v_cache, slot_mapping), new_residual
