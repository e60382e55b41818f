"""The Triton KV store: `store_kv_values`, which every Triton kernel that writes the paged cache calls, and
`store_kv_triton` (store_kv_ref's contract) built on it."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.store_kv.quant import INT4_MAX, INT4_REFIT_STEPS, INT8_MAX, MIN_SCALE, QuantizedKV

_INT8_MAX = tl.constexpr(INT8_MAX)
_INT4_MAX = tl.constexpr(INT4_MAX)
_INT4_REFIT_STEPS = tl.constexpr(INT4_REFIT_STEPS)
_MIN_SCALE = tl.constexpr(MIN_SCALE)


@triton.jit
def store_kv_values(cache_ptr, slot, head, col, values, mask, stride_slot, stride_head,
                    scale_ptr=None, zero_ptr=None, stride_scale_slot=0, stride_scale_head=0,
                    GROUP_SIZE: tl.constexpr = 0, HADAMARD: tl.constexpr = False, offset_ptr=None):
    """The one Triton write into a paged cache [num_blocks, block_size, Hk, D] (slot s of head h at
    s * stride_slot + h * stride_head): `values` at (slot, head, col), broadcast together, where `mask`.

    Callers pass the cache pointer, never a dtype: the cache's element type decides the stored format at
    compile time, so float caches compile to the one store below. Quantized caches (kernels/store_kv/quant.py:
    int8 codes, or uint8 int4 pairs with GROUP_SIZE-value groups, rotated first when HADAMARD) also take
    their scale (and zero) pointers and strides, and whole rows: `values` and `mask` [R, D] with D the
    head_dim, slot and head broadcastable to [R, 1] (`col` is then arange(D)[None, :] and goes unread).
    int4 keys may take `offset_ptr`: a contiguous float32 [Hk, D] vector subtracted from each row first
    (QuantizedKV.offset).
    """
    if cache_ptr.dtype.element_ty == tl.int8:
        _store_int8_rows(cache_ptr, slot, head, values, mask, stride_slot, stride_head, scale_ptr,
                         stride_scale_slot, stride_scale_head)
    elif cache_ptr.dtype.element_ty == tl.uint8:
        _store_int4_rows(cache_ptr, slot, head, values, mask, stride_slot, stride_head, scale_ptr, zero_ptr,
                         stride_scale_slot, stride_scale_head, GROUP_SIZE, HADAMARD, offset_ptr)
    else:
        dst = cache_ptr + slot * stride_slot + head * stride_head + col
        tl.store(dst, values.to(cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _butterfly(x, STAGE: tl.constexpr):
    """One stage of the fast Walsh-Hadamard transform over x's rows: pairs 2**STAGE apart become (a+b, a-b).
    A function per stage, so each stage's span is a constexpr of its own (a constexpr can't be reassigned)."""
    R: tl.constexpr = x.shape[0]
    D: tl.constexpr = x.shape[1]
    H: tl.constexpr = 1 << STAGE
    if H < D:
        pairs = tl.permute(tl.reshape(x, [R, D // (2 * H), 2, H]), (0, 1, 3, 2))
        a, b = tl.split(pairs)
        out = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), [R, D])
    else:
        out = x
    return out


@triton.jit
def hadamard_rows(x):
    """x [R, D] @ H, H the normalized Sylvester Hadamard matrix of D (a power of two, <= 256): a fast
    Walsh-Hadamard transform in registers, log2(D) butterfly stages."""
    D: tl.constexpr = x.shape[1]
    for stage in tl.static_range(8):
        x = _butterfly(x, stage)
    return x * (1.0 / tl.sqrt(D * 1.0))


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
def _int4_codes(x, scale, zero):
    """Nearest codes 0..15 (float32) of x [R, G, group] on the grid code * scale + zero ([R, G] float16)."""
    q = tl.floor((x - zero.to(tl.float32)[:, :, None]) / scale.to(tl.float32)[:, :, None] + 0.5)
    return tl.minimum(tl.maximum(q, 0.0), _INT4_MAX)


@triton.jit
def _store_int4_rows(cache_ptr, slot, head, values, mask, stride_slot, stride_head, scale_ptr, zero_ptr,
                     stride_scale_slot, stride_scale_head, GROUP_SIZE: tl.constexpr, HADAMARD: tl.constexpr,
                     offset_ptr):
    ROWS: tl.constexpr = values.shape[0]
    D: tl.constexpr = values.shape[1]
    GROUPS: tl.constexpr = D // GROUP_SIZE
    x = tl.where(mask, values.to(tl.float32), 0.0)
    if offset_ptr is not None:  # store_rows' `x - cache.offset`, before the rotation
        x = x - tl.load(offset_ptr + head * D + tl.arange(0, D)[None, :], mask=mask, other=0.0)
    if HADAMARD:
        x = hadamard_rows(x)
    x = tl.reshape(x, [ROWS, GROUPS, GROUP_SIZE])
    low = tl.min(x, axis=2)
    scale = tl.maximum((tl.max(x, axis=2) - low) / _INT4_MAX, _MIN_SCALE).to(tl.float16)
    zero = low.to(tl.float16)
    q = _int4_codes(x, scale, zero)
    # quantize_int4's least-squares refits of scale and zero to the codes, op for op.
    mean = tl.sum(x, axis=2) / GROUP_SIZE
    centered = x - mean[:, :, None]
    for _ in tl.static_range(_INT4_REFIT_STEPS):
        q_mean = tl.sum(q, axis=2) / GROUP_SIZE
        dq = q - q_mean[:, :, None]
        var = tl.sum(dq * dq, axis=2)
        fitted = tl.where(var > 0, tl.sum(dq * centered, axis=2) / tl.maximum(var, 1e-9),
                          scale.to(tl.float32))
        fitted = tl.maximum(fitted, _MIN_SCALE)
        scale = fitted.to(tl.float16)
        zero = (mean - fitted * q_mean).to(tl.float16)
        q = _int4_codes(x, scale, zero)
    q = q.to(tl.uint8)
    even, odd = tl.split(tl.reshape(q, [ROWS, D // 2, 2]))  # value 2j low nibble, 2j + 1 high
    byte_mask = tl.max(tl.reshape(mask.to(tl.int32), [ROWS, D // 2, 2]), axis=2) > 0
    rows = _row_offsets(slot, head, stride_slot, stride_head, ROWS)
    tl.store(cache_ptr + rows[:, None] + tl.arange(0, D // 2)[None, :], even | (odd << 4), mask=byte_mask)
    group_mask = tl.max(tl.reshape(mask.to(tl.int32), [ROWS, GROUPS, GROUP_SIZE]), axis=2) > 0
    srows = _row_offsets(slot, head, stride_scale_slot, stride_scale_head, ROWS)
    sdst = srows[:, None] + tl.arange(0, GROUPS)[None, :]
    tl.store(scale_ptr + sdst, scale, mask=group_mask)
    tl.store(zero_ptr + sdst, zero, mask=group_mask)


def quantized_operands(cache: torch.Tensor | QuantizedKV) -> tuple:
    """A cache's Triton arguments: (stored tensor, scale, zero, scale slot stride, scale head stride, group
    size, hadamard); for a float cache (tensor, None, None, None, None, 0, False): Nones are constexprs, so
    the float kernels keep their signatures and code."""
    if not isinstance(cache, QuantizedKV):
        return cache, None, None, None, None, 0, False
    if not (cache.codes.is_contiguous() and cache.scale.is_contiguous()):
        raise ValueError("store_kv: quantized caches and their scales must be contiguous")
    return (cache.codes, cache.scale, cache.zero, cache.scale.stride(1), cache.scale.stride(2),
            cache.group_size, cache.hadamard)


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, k_offset_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kc_slot, stride_kc_h, stride_vc_slot, stride_vc_h,
    k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr,
    stride_ks_slot, stride_ks_h, stride_vs_slot, stride_vs_h,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    K_GROUP: tl.constexpr, V_GROUP: tl.constexpr, K_HADAMARD: tl.constexpr, V_HADAMARD: tl.constexpr,
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
        store_kv_values(k_cache_ptr, slot, heads, cols, k, mask, stride_kc_slot, stride_kc_h, k_scale_ptr,
                        k_zero_ptr, stride_ks_slot, stride_ks_h, K_GROUP, K_HADAMARD, k_offset_ptr)
        store_kv_values(v_cache_ptr, slot, heads, cols, v, mask, stride_vc_slot, stride_vc_h, v_scale_ptr,
                        v_zero_ptr, stride_vs_slot, stride_vs_h, V_GROUP, V_HADAMARD)


def key_offset(cache: torch.Tensor | QuantizedKV) -> torch.Tensor | None:
    """A cache's key offset operand (QuantizedKV.offset); None, a constexpr, for every other cache."""
    return cache.offset if isinstance(cache, QuantizedKV) else None


def _rows_with_unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    # Any token/head strides are fine (k/v arrive as views of the fused qkv output); D must be contiguous.
    return x if x.stride(-1) == 1 else x.contiguous()


def check_quantized_rows(cache: torch.Tensor | QuantizedKV, op: str) -> None:
    """Quantized stores take whole power-of-two rows (one tile holds a row's scale groups)."""
    head_dim = cache.shape[3]
    if isinstance(cache, QuantizedKV) and head_dim & (head_dim - 1):
        raise ValueError(f"{op}: a quantized KV cache needs a power-of-two head_dim, got {head_dim}")


def store_kv_triton(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor | QuantizedKV,
    v_cache: torch.Tensor | QuantizedKV, slot_mapping: torch.Tensor,
) -> None:
    """k, v [T, Hk, D] → cache slots `slot_mapping` [T] of k_cache/v_cache [num_blocks, block_size, Hk, D].

    Same as store_kv_ref (quantized caches included), plus: slots < 0 are skipped (padding tokens). One
    program per token, all heads.
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
    check_quantized_rows(k_cache, "store_kv")
    k_offset = key_offset(k_cache)
    k_cache, k_scale, k_zero, ks_slot, ks_h, k_group, k_hadamard = quantized_operands(k_cache)
    v_cache, v_scale, v_zero, vs_slot, vs_h, v_group, v_hadamard = quantized_operands(v_cache)
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        # Slot s sits at s * stride(1) only when blocks are packed back to back (store_kv_ref's .view too).
        raise ValueError("store_kv: caches must be contiguous [num_blocks, block_size, Hk, D]")
    k, v = _rows_with_unit_last_stride(k), _rows_with_unit_last_stride(v)
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, k_offset,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2),
        k_scale, k_zero, v_scale, v_zero, ks_slot, ks_h, vs_slot, vs_h,
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        K_GROUP=k_group, V_GROUP=v_group, K_HADAMARD=k_hadamard, V_HADAMARD=v_hadamard,
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1,
    )
