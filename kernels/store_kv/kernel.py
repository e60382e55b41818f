"""The Triton KV store: `store_kv_values`, which every Triton kernel that writes the paged cache calls, and
`store_kv_triton` (store_kv_ref's contract) built on it."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.store_kv.quant import INT4_MAX, INT8_MAX, MIN_SCALE, QuantizedKV

_INT8_MAX = tl.constexpr(INT8_MAX)
_INT4_MAX = tl.constexpr(INT4_MAX)
_MIN_SCALE = tl.constexpr(MIN_SCALE)


@triton.jit
def store_kv_values(cache_ptr, slot, head, col, values, mask, stride_slot, stride_head,
                    scale_ptr=None, zero_ptr=None, stride_scale_slot=0, stride_scale_head=0,
                    GROUP_SIZE: tl.constexpr = 0):
    """The one Triton write into a paged cache [num_blocks, block_size, Hk, D] (slot s of head h at
    s * stride_slot + h * stride_head): `values` at (slot, head, col), broadcast together, where `mask`.

    Callers pass the cache pointer, never a dtype: the cache's element type decides the stored format at
    compile time, so float caches compile to the one store below. Quantized caches (kernels/store_kv/quant.py:
    int8 codes, or uint8 int4 pairs with GROUP_SIZE-value groups) also take their scale (and zero) pointers
    and strides, and whole rows: `values` and `mask` [R, D] with D = head_dim, `col` = arange(D)[None, :],
    slot and head broadcastable to [R, 1].
    """
    if cache_ptr.dtype.element_ty == tl.int8:
        _store_int8_rows(cache_ptr, slot, head, values, mask, stride_slot, stride_head, scale_ptr,
                         stride_scale_slot, stride_scale_head)
    elif cache_ptr.dtype.element_ty == tl.uint8:
        _store_int4_rows(cache_ptr, slot, head, values, mask, stride_slot, stride_head, scale_ptr, zero_ptr,
                         stride_scale_slot, stride_scale_head, GROUP_SIZE)
    else:
        dst = cache_ptr + slot * stride_slot + head * stride_head + col
        tl.store(dst, values.to(cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row_offsets(slot, head, stride_slot, stride_head, ROWS: tl.constexpr):
    """[ROWS] offsets of rows (slot, head) broadcast to [ROWS, 1]."""
    return tl.reshape(slot * stride_slot + head * stride_head + tl.zeros([ROWS, 1], tl.int64), [ROWS])


@triton.jit
def _store_int8_rows(cache_ptr, slot, head, values, mask, stride_slot, stride_head, scale_ptr,
                     stride_scale_slot, stride_scale_head):
    ROWS: tl.constexpr = values.shape[0]
    D: tl.constexpr = values.shape[1]
    x = tl.where(mask, values.to(tl.float32), 0.0)
    # The scale is rounded to its float16 storage before dividing by it: the reader multiplies by that one.
    scale = tl.maximum(tl.max(tl.abs(x), axis=1) / _INT8_MAX, _MIN_SCALE).to(tl.float16)
    codes = tl.floor(x / scale.to(tl.float32)[:, None] + 0.5)
    codes = tl.minimum(tl.maximum(codes, -_INT8_MAX), _INT8_MAX)
    rows = _row_offsets(slot, head, stride_slot, stride_head, ROWS)
    tl.store(cache_ptr + rows[:, None] + tl.arange(0, D)[None, :], codes.to(tl.int8), mask=mask)
    live = tl.max(mask.to(tl.int32), axis=1) > 0
    srows = _row_offsets(slot, head, stride_scale_slot, stride_scale_head, ROWS)
    tl.store(scale_ptr + srows, scale, mask=live)


@triton.jit
def _store_int4_rows(cache_ptr, slot, head, values, mask, stride_slot, stride_head, scale_ptr, zero_ptr,
                     stride_scale_slot, stride_scale_head, GROUP_SIZE: tl.constexpr):
    ROWS: tl.constexpr = values.shape[0]
    D: tl.constexpr = values.shape[1]
    GROUPS: tl.constexpr = D // GROUP_SIZE
    x = tl.reshape(values.to(tl.float32), [ROWS, GROUPS, GROUP_SIZE])
    low = tl.min(x, axis=2)
    scale = tl.maximum((tl.max(x, axis=2) - low) / _INT4_MAX, _MIN_SCALE).to(tl.float16)
    zero = low.to(tl.float16)
    q = tl.floor((x - zero.to(tl.float32)[:, :, None]) / scale.to(tl.float32)[:, :, None] + 0.5)
    q = tl.minimum(tl.maximum(q, 0.0), _INT4_MAX).to(tl.uint8)
    even, odd = tl.split(tl.reshape(q, [ROWS, D // 2, 2]))  # value 2j low nibble, 2j + 1 high
    byte_mask = tl.max(tl.reshape(mask.to(tl.int32), [ROWS, D // 2, 2]), axis=2) > 0
    rows = _row_offsets(slot, head, stride_slot, stride_head, ROWS)
    tl.store(cache_ptr + rows[:, None] + tl.arange(0, D // 2)[None, :], even | (odd << 4), mask=byte_mask)
    group_mask = tl.max(tl.reshape(mask.to(tl.int32), [ROWS, GROUPS, GROUP_SIZE]), axis=2) > 0
    srows = _row_offsets(slot, head, stride_scale_slot, stride_scale_head, ROWS)
    sdst = srows[:, None] + tl.arange(0, GROUPS)[None, :]
    tl.store(scale_ptr + sdst, scale, mask=group_mask)
    tl.store(zero_ptr + sdst, zero, mask=group_mask)


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kc_slot, stride_kc_h, stride_vc_slot, stride_vc_h,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    # A negative slot marks a padding token (a CUDA-graph batch padded to its captured size): write nothing.
    if slot >= 0:
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)
        t = token.to(tl.int64)
        k = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
        v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
        heads, cols = offs_h[:, None], offs_d[None, :]
        store_kv_values(k_cache_ptr, slot, heads, cols, k, mask, stride_kc_slot, stride_kc_h)
        store_kv_values(v_cache_ptr, slot, heads, cols, v, mask, stride_vc_slot, stride_vc_h)


def _rows_with_unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    # Any token/head strides are fine (k/v arrive as views of the fused qkv output); D must be contiguous.
    return x if x.stride(-1) == 1 else x.contiguous()


def store_kv_triton(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """k, v [T, Hk, D] → cache slots `slot_mapping` [T] of k_cache/v_cache [num_blocks, block_size, Hk, D].

    Same as store_kv_ref, plus: slots < 0 are skipped (padding tokens). One program per token, all heads.
    """
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    if k.shape[1:] != (num_kv_heads, head_dim) or v.shape != k.shape or slot_mapping.shape[0] != num_tokens:
        raise ValueError(
            f"store_kv: k {tuple(k.shape)}, v {tuple(v.shape)}, slots {tuple(slot_mapping.shape)} do not fit "
            f"cache rows [{num_kv_heads}, {head_dim}]"
        )
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        # Slot s sits at s * stride(1) only when blocks are packed back to back (store_kv_ref's .view too).
        raise ValueError("store_kv: caches must be contiguous [num_blocks, block_size, Hk, D]")
    k, v = _rows_with_unit_last_stride(k), _rows_with_unit_last_stride(v)
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1,
    )
