"""Triton qkv projection of a few decode rows with rotary and the KV store in its epilogue.

For 2..16 rows (bs2-16 decode) the qkv projection is the skinny GEMM's tensor-core path (kernels/linear:
weight tile on the left of tl.dot), and rotary + KV store was a kernel of its own after it. Here each program
owns PAIRS rotary pairs of one head: weight rows j..j+PAIRS and their partners j+D/2..j+D/2+PAIRS, one
[2·PAIRS, BLOCK_K] tile. Its epilogue rounds the projection to the activation dtype (as the unfused path
stores it), rotates the pairs in fp32, and writes q columns to q_out, k columns rotated and v columns as they
are into each row's cache slot through the one Triton KV store (a negative slot is a padding row: no
store). One kernel less per layer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.linear.config import SHARED_MEMORY_BUDGET, SKINNY_MAX_M, pick_config
from kernels.linear.kernel import stream_k
from kernels.pdl import pdl_launch
from kernels.store_kv.kernel import store_kv_values

_MAX_PAIRS = 32  # 64 weight rows a program: the MMA height the tuned qkv config uses


@triton.jit
def _qkv_rope_kernel(
    x_ptr, w_ptr, q_out_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    M, K, stride_xm, stride_wn, stride_qt, stride_qh, stride_cos, stride_sin,
    stride_kc_slot, stride_kc_h, stride_vc_slot, stride_vc_h,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAIRS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr,
):
    HALF: tl.constexpr = HEAD_DIM // 2
    pid = tl.program_id(0)
    head = pid // (HALF // PAIRS)
    j0 = (pid % (HALF // PAIRS)) * PAIRS
    r = tl.arange(0, 2 * PAIRS)
    col = j0 + (r % PAIRS) + (r // PAIRS) * HALF  # first-half columns, then their partners
    offs_k = tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    w_ptrs = w_ptr + (head * HEAD_DIM + col)[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    x_ptrs = x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None]  # x tiles transposed: [BLOCK_K, BLOCK_M]
    m_mask = offs_m[None, :] < M
    always = r[:, None] >= 0  # every weight row exists (the wrapper checks N = heads × HEAD_DIM)
    acc = tl.zeros((2 * PAIRS, BLOCK_M), dtype=tl.float32)
    acc = stream_k(acc, w_ptrs, x_ptrs, always, m_mask, K, K, BLOCK_K, True, True, DOT_PRECISION, False,
                   USE_PDL)  # the first weight tile before the PDL wait

    out = acc.to(q_out_ptr.dtype.element_ty).to(tl.float32)  # [2·PAIRS, BLOCK_M]
    x1, x2 = tl.split(tl.permute(tl.reshape(out, (2, PAIRS, BLOCK_M)), (1, 2, 0)))  # [PAIRS, BLOCK_M] each
    pair = j0 + tl.arange(0, PAIRS)
    cos = tl.load(cos_ptr + offs_m[None, :] * stride_cos + pair[:, None], mask=m_mask, other=0.0)
    sin = tl.load(sin_ptr + offs_m[None, :] * stride_sin + pair[:, None], mask=m_mask, other=0.0)
    cos, sin = cos.to(tl.float32), sin.to(tl.float32)
    rotated = tl.reshape(tl.permute(tl.join(x1 * cos - x2 * sin, x2 * cos + x1 * sin), (2, 0, 1)),
                         (2 * PAIRS, BLOCK_M))
    if head < NUM_Q_HEADS:
        dst = q_out_ptr + offs_m[None, :].to(tl.int64) * stride_qt + head * stride_qh + col[:, None]
        tl.store(dst, rotated.to(q_out_ptr.dtype.element_ty), mask=m_mask)
    else:
        slot = tl.load(slot_ptr + offs_m, mask=offs_m < M, other=-1).to(tl.int64)[None, :]
        keep = m_mask & (slot >= 0)
        if head < NUM_Q_HEADS + NUM_KV_HEADS:
            store_kv_values(k_cache_ptr, slot, head - NUM_Q_HEADS, col[:, None], rotated, keep,
                            stride_kc_slot, stride_kc_h)
        else:
            store_kv_values(v_cache_ptr, slot, head - NUM_Q_HEADS - NUM_KV_HEADS, col[:, None], out, keep,
                            stride_vc_slot, stride_vc_h)


def qkv_rope_supported(h: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int) -> bool:
    """2..SKINNY_MAX_M contiguous rows, a qkv weight of whole heads, K a whole number of tiles, caches laid
    out [blocks, block_size, heads, D] with unit-stride heads, one table row per input row."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    rows, k = (h.shape[0], h.shape[1]) if h.dim() == 2 else (0, 0)
    half = head_dim // 2
    return (1 < rows <= SKINNY_MAX_M and h.is_contiguous() and head_dim % 2 == 0 and half >= 1
            and half & (half - 1) == 0
            and weight.shape == ((num_heads + 2 * num_kv_heads) * head_dim, k) and weight.stride(1) == 1
            and k % pick_config(rows, weight.shape[0], k).block_k == 0
            and h.dtype == weight.dtype == k_cache.dtype == v_cache.dtype
            and cos.shape[0] == sin.shape[0] == rows and cos.stride(1) == sin.stride(1) == 1
            and k_cache.stride(3) == v_cache.stride(3) == 1
            and k_cache.stride(0) == k_cache.shape[1] * k_cache.stride(1)
            and v_cache.stride(0) == v_cache.shape[1] * v_cache.stride(1))


def qkv_rotary_store(h: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                     num_heads: int) -> torch.Tensor:
    """rotary_store_kv of the qkv projection of normed rows h [T, K]; returns rotated q [T, Hq, D].
    Callers check qkv_rope_supported."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    rows, k = h.shape
    half = head_dim // 2
    pairs = min(_MAX_PAIRS, half)
    config = pick_config(rows, weight.shape[0], k)
    block_m = 16
    num_stages = config.num_stages
    per_stage = (block_m + 2 * pairs) * config.block_k * h.element_size()
    while num_stages > 1 and num_stages * per_stage > SHARED_MEMORY_BUDGET:
        num_stages -= 1
    q = torch.empty((rows, num_heads, head_dim), dtype=h.dtype, device=h.device)
    grid = ((num_heads + 2 * num_kv_heads) * (half // pairs),)
    _qkv_rope_kernel[grid](
        h, weight, q, cos, sin, k_cache, v_cache, slot_mapping, rows, k, h.stride(0), weight.stride(0),
        q.stride(0), q.stride(1), cos.stride(0), sin.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(1), v_cache.stride(2), NUM_Q_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim, PAIRS=pairs, BLOCK_M=block_m, BLOCK_K=config.block_k,
        DOT_PRECISION="ieee" if h.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps if h.is_cuda else 1, num_stages=num_stages,
        **pdl_launch(h.device),
    )
    return q
