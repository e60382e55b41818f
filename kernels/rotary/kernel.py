"""Triton rotary embedding in HF's rotate-half layout (signature and result dtypes of apply_rotary_ref)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.device import num_sms
from kernels.pdl import pdl_launch, pdl_release, pdl_wait
from kernels.store_kv.kernel import check_quantized_rows, key_offset, quantized_operands, store_kv_values
from kernels.store_kv.quant import QuantizedKV

ROTARY_STORE_HEAD_WARPS = 1  # a program's rows: GROUP query heads and one k row, or one v row
# k and v in programs of their own while that grid fits one wave of these one-warp programs an SM; past it
# (prefill chunks) one program stores both: H100, int8 cache, 512 tokens: 10.3 µs split, 5.4 not.
ROTARY_STORE_SPLIT_PER_SM = 32


@triton.jit
def _rotated_halves(
    x_ptr, token, cos, sin, stride_xt, stride_xh,
    NUM_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """One token's heads rotated in fp32: first and second halves [BLOCK_H, BLOCK_HALF], and their mask."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (offs_h[:, None] < NUM_HEADS) & (offs_d[None, :] < HALF)
    src = x_ptr + token * stride_xt + offs_h[:, None] * stride_xh + offs_d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    # fp32 math, one rounding at the store: within one output ulp of the reference, which rounds each product.
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin, mask


@triton.jit
def _rotate_heads(
    x_ptr, out_ptr, token, cos, sin, stride_xt, stride_xh, stride_ot, stride_oh,
    NUM_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    first, second, mask = _rotated_halves(x_ptr, token, cos, sin, stride_xt, stride_xh, NUM_HEADS, HALF,
                                          BLOCK_H, BLOCK_HALF)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    dst = out_ptr + token * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :]
    tl.store(dst, first.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, second.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tables(cos_ptr, sin_ptr, token, stride_cos, stride_sin, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """One token's cos and sin rows [1, BLOCK_HALF] in fp32: read once, reused for every q and k head."""
    offs_d = tl.arange(0, BLOCK_HALF)
    d_mask = offs_d < HALF
    cos = tl.load(cos_ptr + token * stride_cos + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + token * stride_sin + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    return cos, sin


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cos, stride_sin,
    stride_qot, stride_qoh, stride_kot, stride_koh,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cos, sin = _tables(cos_ptr, sin_ptr, token, stride_cos, stride_sin, HALF, BLOCK_HALF)
    _rotate_heads(q_ptr, q_out_ptr, token, cos, sin, stride_qt, stride_qh, stride_qot, stride_qoh,
                  NUM_Q_HEADS, HALF, BLOCK_QH, BLOCK_HALF)
    _rotate_heads(k_ptr, k_out_ptr, token, cos, sin, stride_kt, stride_kh, stride_kot, stride_koh,
                  NUM_KV_HEADS, HALF, BLOCK_KH, BLOCK_HALF)


@triton.jit
def _rotary_store_kv_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cos, stride_sin,
    stride_qot, stride_qoh, stride_kc_slot, stride_kc_h, stride_vc_slot, stride_vc_h,
    k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr, k_offset_ptr,
    stride_ks_slot, stride_ks_h, stride_vs_slot, stride_vs_h,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr, USE_PDL: tl.constexpr,
    QUANTIZED: tl.constexpr, K_GROUP: tl.constexpr, V_GROUP: tl.constexpr, K_HADAMARD: tl.constexpr,
    V_HADAMARD: tl.constexpr,
):
    pdl_wait(USE_PDL)  # q, k, v come from the qkv projection just before (kernels/pdl.py)
    pdl_release(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    cos, sin = _tables(cos_ptr, sin_ptr, token, stride_cos, stride_sin, HALF, BLOCK_HALF)
    _rotate_heads(q_ptr, q_out_ptr, token, cos, sin, stride_qt, stride_qh, stride_qot, stride_qoh,
                  NUM_Q_HEADS, HALF, BLOCK_QH, BLOCK_HALF)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    # A negative slot marks a padding token (a CUDA-graph batch padded to its captured size): no KV write.
    if slot >= 0:
        # Rotated k goes straight into its cache slot, v as it is: both through the one Triton KV store.
        first, second, k_mask = _rotated_halves(k_ptr, token, cos, sin, stride_kt, stride_kh, NUM_KV_HEADS,
                                                HALF, BLOCK_KH, BLOCK_HALF)
        offs_h = tl.arange(0, BLOCK_KH)[:, None]
        if QUANTIZED:
            # A quantized row's scale covers both halves: store whole rows (HALF == BLOCK_HALF here).
            k = tl.reshape(tl.permute(tl.join(first, second), (0, 2, 1)), [BLOCK_KH, 2 * BLOCK_HALF])
            cols = tl.arange(0, 2 * BLOCK_HALF)[None, :]
            store_kv_values(k_cache_ptr, slot, offs_h, cols, k, (offs_h < NUM_KV_HEADS) & (cols < 2 * HALF),
                            stride_kc_slot, stride_kc_h, k_scale_ptr, k_zero_ptr, stride_ks_slot, stride_ks_h,
                            K_GROUP, K_HADAMARD, k_offset_ptr)
        else:
            offs_d = tl.arange(0, BLOCK_HALF)[None, :]
            store_kv_values(k_cache_ptr, slot, offs_h, offs_d, first, k_mask, stride_kc_slot, stride_kc_h)
            store_kv_values(k_cache_ptr, slot, offs_h, offs_d + HALF, second, k_mask, stride_kc_slot,
                            stride_kc_h)
        offs_full = tl.arange(0, 2 * BLOCK_HALF)[None, :]
        mask = (offs_h < NUM_KV_HEADS) & (offs_full < 2 * HALF)
        v = tl.load(v_ptr + token * stride_vt + offs_h * stride_vh + offs_full, mask=mask)
        store_kv_values(v_cache_ptr, slot, offs_h, offs_full, v, mask, stride_vc_slot, stride_vc_h,
                        v_scale_ptr, v_zero_ptr, stride_vs_slot, stride_vs_h, V_GROUP, V_HADAMARD)


@triton.jit
def _rotary_store_head_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cos, stride_sin,
    stride_qot, stride_qoh, stride_kc_slot, stride_kc_h, stride_vc_slot, stride_vc_h,
    k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr, k_offset_ptr,
    stride_ks_slot, stride_ks_h, stride_vs_slot, stride_vs_h,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HALF: tl.constexpr, USE_PDL: tl.constexpr,
    K_GROUP: tl.constexpr, V_GROUP: tl.constexpr, K_HADAMARD: tl.constexpr, V_HADAMARD: tl.constexpr,
    V_PART: tl.constexpr,
):
    """_rotary_store_kv_kernel for a quantized cache, one program per (token, KV head, part): part 0 rotates
    the head's GROUP query heads and its k row, part V_PART stores its v row (V_PART 0: one program does
    both); each row is quantized as a whole (HALF is a power of two). int4's rotation and scale refits are a
    chain of dependent steps a row, which one program per token ran for every head's k and v in turn."""
    pdl_wait(USE_PDL)  # q, k, v come from the qkv projection just before (kernels/pdl.py)
    pdl_release(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    slot = tl.load(slot_ptr + token).to(tl.int64)  # a negative slot marks a padding token: no KV write
    cols = tl.arange(0, 2 * HALF)[None, :]
    row = head + tl.zeros([1, 1], tl.int32)
    part = tl.program_id(2)
    if part == 0:
        cos, sin = _tables(cos_ptr, sin_ptr, token, stride_cos, stride_sin, HALF, HALF)
        _rotate_heads(q_ptr + head * GROUP * stride_qh, q_out_ptr + head * GROUP * stride_qoh, token, cos,
                      sin, stride_qt, stride_qh, stride_qot, stride_qoh, GROUP, HALF, BLOCK_G, HALF)
        if slot >= 0:
            first, second, _ = _rotated_halves(k_ptr + head * stride_kh, token, cos, sin, stride_kt,
                                               stride_kh, 1, HALF, 1, HALF)
            k = tl.reshape(tl.permute(tl.join(first, second), (0, 2, 1)), [1, 2 * HALF])
            store_kv_values(k_cache_ptr, slot, row, cols, k, cols < 2 * HALF, stride_kc_slot, stride_kc_h,
                            k_scale_ptr, k_zero_ptr, stride_ks_slot, stride_ks_h, K_GROUP, K_HADAMARD,
                            k_offset_ptr)
    if part == V_PART and slot >= 0:
        v = tl.load(v_ptr + token * stride_vt + head * stride_vh + cols)
        store_kv_values(v_cache_ptr, slot, row, cols, v, cols < 2 * HALF, stride_vc_slot, stride_vc_h,
                        v_scale_ptr, v_zero_ptr, stride_vs_slot, stride_vs_h, V_GROUP, V_HADAMARD)


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


def rotary_store_kv_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    k_cache: torch.Tensor | QuantizedKV, v_cache: torch.Tensor | QuantizedKV, slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """rotary_store_kv_ref's contract in one kernel: one program per token rotates its q heads into a fresh
    tensor and writes its rotated k heads and its v heads into cache slot `slot_mapping[t]` (< 0: skipped);
    for a quantized cache, one program per (token, KV head), k and v apart while that grid fits one wave
    (_rotary_store_head_kernel)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, half = k.shape[1], head_dim // 2
    if (head_dim % 2 or k.shape != (num_tokens, num_kv_heads, head_dim) or v.shape != k.shape
            or k_cache.shape[2:] != (num_kv_heads, head_dim) or slot_mapping.shape[0] != num_tokens):
        raise ValueError(f"rotary_store_kv: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"slots {tuple(slot_mapping.shape)} do not fit cache rows "
                         f"{tuple(k_cache.shape[2:])}")
    if cos.shape != (num_tokens, half) or sin.shape != cos.shape:
        raise ValueError(
            f"rotary_store_kv: cos {tuple(cos.shape)}/sin {tuple(sin.shape)} must be [{num_tokens}, {half}]")
    check_quantized_rows(k_cache, "rotary_store_kv")
    quantized = isinstance(k_cache, QuantizedKV)
    k_offset = key_offset(k_cache)
    k_cache, k_scale, k_zero, ks_slot, ks_h, k_group, k_hadamard = quantized_operands(k_cache)
    v_cache, v_scale, v_zero, vs_slot, vs_h, v_group, v_hadamard = quantized_operands(v_cache)
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("rotary_store_kv: caches must be contiguous [num_blocks, block_size, Hk, D]")
    q_out = torch.empty(q.shape, dtype=torch.promote_types(q.dtype, cos.dtype), device=q.device)
    if num_tokens == 0:
        return q_out
    q, k, v, cos, sin = (_unit_last_stride(t) for t in (q, k, v, cos, sin))
    if quantized and num_q_heads % num_kv_heads == 0:
        group = num_q_heads // num_kv_heads
        split = 2 * num_tokens * num_kv_heads <= num_sms(q.device) * ROTARY_STORE_SPLIT_PER_SM
        _rotary_store_head_kernel[(num_tokens, num_kv_heads, 1 + split)](
            q, k, v, cos, sin, q_out, k_cache, v_cache, slot_mapping,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            cos.stride(0), sin.stride(0), q_out.stride(0), q_out.stride(1),
            k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2),
            k_scale, k_zero, v_scale, v_zero, k_offset, ks_slot, ks_h, vs_slot, vs_h,
            GROUP=group, BLOCK_G=triton.next_power_of_2(group), HALF=half, K_GROUP=k_group, V_GROUP=v_group,
            K_HADAMARD=k_hadamard, V_HADAMARD=v_hadamard, V_PART=int(split),
            num_warps=ROTARY_STORE_HEAD_WARPS, **pdl_launch(q.device),
        )
        return q_out
    _rotary_store_kv_kernel[(num_tokens,)](
        q, k, v, cos, sin, q_out, k_cache, v_cache, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), sin.stride(0), q_out.stride(0), q_out.stride(1),
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2),
        k_scale, k_zero, v_scale, v_zero, k_offset, ks_slot, ks_h, vs_slot, vs_h,
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, HALF=half,
        BLOCK_QH=triton.next_power_of_2(num_q_heads), BLOCK_KH=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=triton.next_power_of_2(half), QUANTIZED=quantized, K_GROUP=k_group, V_GROUP=v_group,
        K_HADAMARD=k_hadamard, V_HADAMARD=v_hadamard,
        num_warps=4 if num_q_heads * head_dim >= 2048 else 1, **pdl_launch(q.device),
    )
    return q_out
