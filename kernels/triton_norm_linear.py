"""Triton RMSNorm (+ residual add) fused into a one-row GEMV (rms_norm_linear_ref's contract).

At bs1 a decode layer's two RMSNorms are latency, not bandwidth (4096 elements each), and each costs a kernel
boundary before the projection after it. Here every GEMV program first recomputes the row's mean square
itself (the row is 8 KB; it stays in L2), then streams its weight rows with the normalized input built tile by
tile. Program 0 also writes the new residual. The weight's first tile is loaded before the PDL wait.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_linear import weight_tile
from kernels.triton_pdl import pdl_launch, pdl_release, pdl_wait

_BLOCK_N, _BLOCK_K, _NUM_WARPS = 4, 2048, 8  # the one-row skinny GEMM's tuned tile (kernels/triton_linear.py)


@triton.jit
def _summed(x_ptr, res_ptr, offs, HAS_RES: tl.constexpr):
    """x (+ residual) over offs, rounded to x's dtype as the reference's `x + residual` is."""
    s = tl.load(x_ptr + offs)
    if HAS_RES:
        s = (s.to(tl.float32) + tl.load(res_ptr + offs).to(tl.float32)).to(s.dtype)
    return s


@triton.jit
def _row_rstd(x_ptr, res_ptr, res_out_ptr, K, eps, pid, offs_k, HAS_RES: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """Pass 1: 1/rms of the whole (summed) row, which every program needs; program 0 writes the summed row
    as the new residual."""
    writer = offs_k < tl.where(pid == 0, BLOCK_K, 0)  # a block mask (the interpreter rejects scalar ones)
    squares = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        s = _summed(x_ptr, res_ptr, k0 + offs_k, HAS_RES)
        if HAS_RES:
            tl.store(res_out_ptr + k0 + offs_k, s, mask=writer)
        squares += s.to(tl.float32) * s.to(tl.float32)
    return 1.0 / tl.sqrt(tl.sum(squares, axis=0) / K + eps)


@triton.jit
def _normed(x_ptr, res_ptr, norm_w_ptr, offs, rstd, HAS_RES: tl.constexpr):
    """Pass 2's input tile, rounded as rms_norm_ref: (s · rstd) → dtype, · norm weight → dtype, as fp32."""
    s = _summed(x_ptr, res_ptr, offs, HAS_RES)
    normed = (s.to(tl.float32) * rstd).to(s.dtype).to(tl.float32)
    return (normed * tl.load(norm_w_ptr + offs).to(tl.float32)).to(s.dtype).to(tl.float32)


@triton.jit
def _norm_gemv_kernel(
    x_ptr, res_ptr, norm_w_ptr, w_ptr, out_ptr, res_out_ptr, N, K, stride_wn, eps,
    HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n[:, None] < N
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    w = weight_tile(w_ptrs, n_mask, EVEN_N)
    pdl_release(USE_PDL)
    pdl_wait(USE_PDL)
    rstd = _row_rstd(x_ptr, res_ptr, res_out_ptr, K, eps, pid, offs_k, HAS_RES, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if k0 > 0:
            w_ptrs += BLOCK_K
            w = weight_tile(w_ptrs, n_mask, EVEN_N)
        acc += w.to(tl.float32) * _normed(x_ptr, res_ptr, norm_w_ptr, k0 + offs_k, rstd, HAS_RES)[None, :]
    out = tl.sum(acc, axis=1)
    tl.store(out_ptr + offs_n, out.to(out_ptr.dtype.element_ty), mask=offs_n < N)


def norm_linear_supported(x: torch.Tensor, norm_weight: torch.Tensor, weight: torch.Tensor,
                          residual: torch.Tensor | None, block_k: int = _BLOCK_K) -> bool:
    """One contiguous row whose width is whole K tiles, every tensor in x's dtype."""
    k = x.shape[-1]
    return (x.numel() == k and weight.shape[1] == k and k % block_k == 0 and x.is_contiguous()
            and weight.stride(1) == 1 and norm_weight.dtype == x.dtype == weight.dtype
            and (residual is None or (residual.dtype == x.dtype and residual.is_contiguous())))


def fused_rms_norm_linear(
    x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
    weight: torch.Tensor,
    block_n: int = _BLOCK_N, block_k: int = _BLOCK_K,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear(rms_norm(x + residual)), x + residual) for one row; callers check norm_linear_supported."""
    n, k = weight.shape
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    new_residual = torch.empty_like(x) if residual is not None else x
    _norm_gemv_kernel[(triton.cdiv(n, block_n),)](
        x, residual if residual is not None else x, norm_weight, weight, out, new_residual, n, k,
        weight.stride(0), eps, HAS_RES=residual is not None, BLOCK_N=block_n, BLOCK_K=block_k,
        EVEN_N=n % block_n == 0, num_warps=_NUM_WARPS if x.is_cuda else 1, **pdl_launch(x.device),
    )
    return out, new_residual


def rms_norm_linear_triton(
    x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
    weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """rms_norm_linear_ref's contract: fused for one row, the RMSNorm kernel then linear_triton otherwise."""
    if norm_linear_supported(x, norm_weight, weight, residual):
        return fused_rms_norm_linear(x, residual, norm_weight, eps, weight)
    from kernels.triton_linear import linear_triton
    from kernels.triton_rmsnorm import rms_norm_and_residual_triton

    h, new_residual = rms_norm_and_residual_triton(x, norm_weight, eps, residual)
    return linear_triton(h, weight), new_residual


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
    rstd = _row_rstd(x_ptr, res_ptr, res_out_ptr, K, eps, pid, offs_k, HAS_RES, BLOCK_K)
    acc = tl.zeros([4, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if k0 > 0:
            w_ptrs += BLOCK_K
            w = tl.load(w_ptrs, eviction_policy="evict_first")
        acc += w.to(tl.float32) * _normed(x_ptr, res_ptr, norm_w_ptr, k0 + offs_k, rstd, HAS_RES)[None, :]
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
            dst = k_cache_ptr + slot * stride_kc_slot + (head - NUM_Q_HEADS) * stride_kc_h + col
            tl.store(dst, rotated.to(k_cache_ptr.dtype.element_ty))
        else:
            v_head = head - NUM_Q_HEADS - NUM_KV_HEADS
            tl.store(v_cache_ptr + slot * stride_vc_slot + v_head * stride_vc_h + col,
                     out.to(v_cache_ptr.dtype.element_ty))


def norm_qkv_rope_supported(x: torch.Tensor, norm_weight: torch.Tensor, weight: torch.Tensor,
                            residual: torch.Tensor | None, head_dim: int, block_k: int = _BLOCK_K) -> bool:
    """norm_linear_supported, and heads whose halves split into column pairs."""
    return (norm_linear_supported(x, norm_weight, weight, residual, block_k) and head_dim % 4 == 0
            and weight.shape[0] % head_dim == 0)


def fused_rms_norm_qkv_rotary_store(
    x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
    weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor, num_heads: int, block_k: int = _BLOCK_K,
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
        num_warps=_NUM_WARPS if x.is_cuda else 1, **pdl_launch(x.device),
    )
    return q, new_residual


def rms_norm_qkv_rotary_store_triton(
    x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
    weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor, num_heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """rms_norm_qkv_rotary_store_ref's contract: one kernel for one decode row; the norm, then the qkv GEMM
    with rotary + KV store in its epilogue for up to SKINNY_MAX_M rows; otherwise the norm + GEMM path, then
    the fused rotary + KV store kernel."""
    head_dim = k_cache.shape[3]
    if (x.numel() == x.shape[-1] and slot_mapping.numel() == 1
            and norm_qkv_rope_supported(x, norm_weight, weight, residual, head_dim)):
        return fused_rms_norm_qkv_rotary_store(x, residual, norm_weight, eps, weight, cos, sin, k_cache,
                                               v_cache, slot_mapping, num_heads)
    from kernels.triton_qkv_rope import qkv_rope_supported, qkv_rotary_store
    from kernels.triton_rmsnorm import rms_norm_and_residual_triton
    from kernels.triton_rotary import rotary_store_kv_triton

    if qkv_rope_supported(x, weight, cos, sin, k_cache, v_cache, num_heads):
        h, new_residual = rms_norm_and_residual_triton(x, norm_weight, eps, residual)
        q = qkv_rotary_store(h, weight, cos, sin, k_cache, v_cache, slot_mapping, num_heads)
        return q, new_residual

    qkv, new_residual = rms_norm_linear_triton(x, residual, norm_weight, eps, weight)
    num_kv_heads = k_cache.shape[2]
    heads = qkv.view(qkv.shape[0], num_heads + 2 * num_kv_heads, head_dim)
    q, k, v = heads.split_with_sizes([num_heads, num_kv_heads, num_kv_heads], dim=1)
    return rotary_store_kv_triton(q, k, v, cos, sin, k_cache, v_cache, slot_mapping), new_residual
