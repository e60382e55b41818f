"""int4 KV decode tiles loaded one tile ahead: the next tile's codes and scales are in flight while this one's
are dequantized and attended (Triton's pipeliner leaves these loads synchronous: they reach the dots through
integer and float ops, not a plain conversion)."""
from __future__ import annotations

import triton
import triton.language as tl

from kernels.attention.tiles import attend_kv, int4_rows


@triton.jit
def _raw_int4_tile(k_cache_ptr, v_cache_ptr, block_row, n0, limit, kv_head, stride_cb, stride_ct, stride_ch,
                   k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr, stride_ks_slot, stride_ks_h,
                   stride_vs_slot, stride_vs_h, K_GROUP: tl.constexpr, V_GROUP: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Packed K / V codes [BLOCK_N, BLOCK_D / 2] and their float16 scales and zeros [BLOCK_N, groups] of keys
    [n0, n0 + BLOCK_N), as stored; keys at or past `limit` read as zeros (no memory traffic)."""
    pos = n0 + tl.arange(0, BLOCK_N)
    valid = pos < limit
    block = tl.load(block_row + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    token_off = block * stride_cb + (pos % BLOCK_SIZE) * stride_ct + kv_head * stride_ch
    slot = block * BLOCK_SIZE + pos % BLOCK_SIZE
    pairs = token_off[:, None] + tl.arange(0, BLOCK_D // 2)[None, :]
    k_codes = tl.load(k_cache_ptr + pairs, mask=valid[:, None], other=0)
    v_codes = tl.load(v_cache_ptr + pairs, mask=valid[:, None], other=0)
    k_groups = (slot * stride_ks_slot + kv_head * stride_ks_h)[:, None] + tl.arange(0, BLOCK_D // K_GROUP)
    v_groups = (slot * stride_vs_slot + kv_head * stride_vs_h)[:, None] + tl.arange(0, BLOCK_D // V_GROUP)
    k_scale = tl.load(k_scale_ptr + k_groups, mask=valid[:, None], other=0)
    k_zero = tl.load(k_zero_ptr + k_groups, mask=valid[:, None], other=0)
    v_scale = tl.load(v_scale_ptr + v_groups, mask=valid[:, None], other=0)
    v_zero = tl.load(v_zero_ptr + v_groups, mask=valid[:, None], other=0)
    return k_codes, v_codes, k_scale, k_zero, v_scale, v_zero


@triton.jit
def attend_int4_tiles(acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, block_row, first, full_end, kv_head,
                      stride_cb, stride_ct, stride_ch, scale_log2, k_scale_ptr, k_zero_ptr, v_scale_ptr,
                      v_zero_ptr, stride_ks_slot, stride_ks_h, stride_vs_slot, stride_vs_h,
                      K_GROUP: tl.constexpr, V_GROUP: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The decode kernel's whole tiles [first, full_end) of one sequence and KV head over an int4 cache, each
    tile's loads issued one iteration early (the last iteration's prefetch is masked off: past full_end)."""
    kc, vc, ks, kz, vs, vz = _raw_int4_tile(
        k_cache_ptr, v_cache_ptr, block_row, first, full_end, kv_head, stride_cb, stride_ct, stride_ch,
        k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr, stride_ks_slot, stride_ks_h, stride_vs_slot,
        stride_vs_h, K_GROUP, V_GROUP, BLOCK_D, BLOCK_N, BLOCK_SIZE)
    for n0 in range(first, full_end, BLOCK_N):
        kc_next, vc_next, ks_next, kz_next, vs_next, vz_next = _raw_int4_tile(
            k_cache_ptr, v_cache_ptr, block_row, n0 + BLOCK_N, full_end, kv_head, stride_cb, stride_ct,
            stride_ch, k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr, stride_ks_slot, stride_ks_h,
            stride_vs_slot, stride_vs_h, K_GROUP, V_GROUP, BLOCK_D, BLOCK_N, BLOCK_SIZE)
        k = int4_rows(kc, ks, kz, K_GROUP, BLOCK_D)
        v = int4_rows(vc, vs, vz, V_GROUP, BLOCK_D)
        pos = n0 + tl.arange(0, BLOCK_N)
        acc, m_i, l_i = attend_kv(acc, m_i, l_i, q, 0, k, v, pos, pos < full_end, scale_log2, False, False,
                                  DOT_PRECISION)
        kc, vc, ks, kz, vs, vz = kc_next, vc_next, ks_next, kz_next, vs_next, vz_next
    return acc, m_i, l_i
