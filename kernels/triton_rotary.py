"""Triton rotary embedding in HF's rotate-half layout (signature and result dtypes of apply_rotary_ref)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(
    x_ptr, out_ptr, token, cos, sin, stride_xt, stride_xh, stride_ot, stride_oh,
    NUM_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (offs_h[:, None] < NUM_HEADS) & (offs_d[None, :] < HALF)
    src = x_ptr + token * stride_xt + offs_h[:, None] * stride_xh + offs_d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    # fp32 math, one rounding at the store: within one output ulp of the reference, which rounds each product.
    dst = out_ptr + token * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :]
    tl.store(dst, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cos, stride_sin,
    stride_qot, stride_qoh, stride_kot, stride_koh,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    d_mask = offs_d < HALF
    # cos/sin are read once per token and reused for every q and k head.
    cos = tl.load(cos_ptr + token * stride_cos + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + token * stride_sin + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(q_ptr, q_out_ptr, token, cos, sin, stride_qt, stride_qh, stride_qot, stride_qoh,
                  NUM_Q_HEADS, HALF, BLOCK_QH, BLOCK_HALF)
    _rotate_heads(k_ptr, k_out_ptr, token, cos, sin, stride_kt, stride_kh, stride_kot, stride_koh,
                  NUM_KV_HEADS, HALF, BLOCK_KH, BLOCK_HALF)


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    # Token/head strides are free (q, k arrive as views of the fused qkv output); the head dim must be dense.
    return x if x.stride(-1) == 1 else x.contiguous()


def apply_rotary_triton(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hk, D], cos/sin [T, D/2] (one row per token's position) → new (q, k).

    One program per token rotates all its q and k heads; inputs stay unmodified (fresh outputs, like the
    reference).
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    half = head_dim // 2
    if head_dim % 2 or k.shape[0] != num_tokens or k.shape[2] != head_dim:
        raise ValueError(f"apply_rotary: q {tuple(q.shape)}, k {tuple(k.shape)} need equal T, even D")
    if cos.shape != (num_tokens, half) or sin.shape != cos.shape:
        raise ValueError(
            f"apply_rotary: cos {tuple(cos.shape)}/sin {tuple(sin.shape)} must be [{num_tokens}, {half}]")
    # The reference's `x * cos` promotes (bf16 q with fp32 tables gives fp32 out); keep its result dtypes.
    q_out = torch.empty(q.shape, dtype=torch.promote_types(q.dtype, cos.dtype), device=q.device)
    k_out = torch.empty(k.shape, dtype=torch.promote_types(k.dtype, cos.dtype), device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    q, k, cos, sin = (_unit_last_stride(t) for t in (q, k, cos, sin))
    block_half = triton.next_power_of_2(half)
    _rotary_kernel[(num_tokens,)](
        q, k, cos, sin, q_out, k_out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, HALF=half,
        BLOCK_QH=triton.next_power_of_2(num_q_heads), BLOCK_KH=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=block_half,
        num_warps=4 if num_q_heads * head_dim >= 2048 else 1,
    )
    return q_out, k_out
