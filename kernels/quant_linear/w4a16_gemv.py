"""W4A16 GEMV (one input row) in Triton: y [1, N] = x [1, K] · dequant(W4Weight)ᵀ, fp32 accumulation.

An int4 GEMV near HBM speed issues several instructions a weight value, and ncu on an H100 has the bytes
reading near its issue limit (73% of slots) with DRAM at 43-48% (docs/benchmarks.md "Quantized GEMVs on
the H100"). The inner loop keeps to about one integer op and one fp32 multiply-add a value:
  - a nibble q becomes a float by masking it into the mantissa of 1.0 where it already lies after one
    shift per pair of nibbles ("windows"): bits 15..18 read as f = 1 + q/256, bits 19..22 as f = 1 + q/16.
    The mask and the exponent bits are one LOP3 only while 1.0's bits sit in a register: with both as
    immediates ptxas emits an and and an or, so the launcher passes them in as ONE (0x3F800000);
  - the position's power of two moves onto x (x' = 256·x or 16·x, exact), so Σ q·x = Σ f·x' − Σ x';
  - the group's affine stays out of the inner product: w = q·s + z, so per group
    Σ w·x = s · (Σ f·x' − Σ x') + z · Σ x, with Σ x' and Σ x per group taken once per tile for all rows.
Under programmatic dependent launch (kernels/pdl.py) a program reads its first weight tile before waiting
for the kernel before. The loops are plain: asked to pipeline (tl.range num_stages, cp.async) every config
lost 3-16% on an H100 — the loop is bound by its instructions (docs/benchmarks.md, session 13).
A program owns BLOCK_N weight rows and walks its share of K (split-K: SPLIT_K programs per row block add
fp32 partial sums atomically, or with MERGE the last split adds them: common.store_rows), BLOCK_K
values a step, the tile shaped [BLOCK_N, groups, per group] so each group's scale and low load once. Two
readings of the packed bytes:
  - bytes: [.., group / 2] uint8, the low and high nibble of a byte are values 2b and 2b + 1 (one window a
    byte); a bf16 input loads as int32 pairs (contiguous), each half shifted into an fp32;
  - words: [.., group / 8] int32, nibble j of a word is value 8w + j (little-endian bytes), four windows a
    word; the input loads as int32 pairs [.., 4] split in registers into the eight values of a word.
"""
from __future__ import annotations

import triton
import triton.language as tl

from kernels.linear.kernel import first_weight_tile, weight_tile
from kernels.quant_linear.common import store_rows


@triton.jit
def nibble_float(w, SHIFT: tl.constexpr, ONE):
    """1 + q/16 (float32) for the nibble q at bits SHIFT..SHIFT+3 of the int32 w (ONE: 1.0's bits)."""
    if SHIFT <= 19:
        m = w << (19 - SHIFT)
    else:
        m = w >> (SHIFT - 19)  # arithmetic shift: the sign bits it drags in are masked off
    return ((m & 0x00780000) | ONE).to(tl.float32, bitcast=True)


@triton.jit
def window_floats(w, SHIFT: tl.constexpr, ONE):
    """The nibbles at bits SHIFT..SHIFT+3 and SHIFT+4..SHIFT+7 of the int32 w as (1 + q/256, 1 + q/16):
    one shift puts them at bits 15..18 and 19..22, one LOP3 each masks them into 1.0 (ONE: its bits)."""
    if SHIFT <= 15:
        m = w << (15 - SHIFT)
    else:
        m = w >> (SHIFT - 15)  # the sign bits it drags in are masked off
    return (((m & 0x00078000) | ONE).to(tl.float32, bitcast=True),
            ((m & 0x00780000) | ONE).to(tl.float32, bitcast=True))


@triton.jit
def pair_floats(pair):
    """An int32 holding two bf16 (low half first) → both as float32 (a bf16 is the high half of its fp32)."""
    return (pair << 16).to(tl.float32, bitcast=True), (pair & -65536).to(tl.float32, bitcast=True)


@triton.jit
def group_affine(acc, t, sx_scaled, sx, s_ptrs, z_ptrs, n_mask, EVEN_N: tl.constexpr):
    """acc [BLOCK_N, GROUPS] += s·(Σf·x' − Σx') + z·Σx for this step's groups (t = Σf·x' per row and group;
    Σx' and Σx per group)."""
    s, z = group_scales(s_ptrs, z_ptrs, n_mask, EVEN_N)
    return acc + (t - sx_scaled[None, :]) * s + z * sx[None, :]


@triton.jit
def group_scales(s_ptrs, z_ptrs, n_mask, EVEN_N: tl.constexpr):
    """The groups' scale and low as fp32 (rows past N, a ragged last block, as zeros)."""
    if EVEN_N:
        s = tl.load(s_ptrs).to(tl.float32)
        z = tl.load(z_ptrs).to(tl.float32)
    else:
        s = tl.load(s_ptrs, mask=n_mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptrs, mask=n_mask, other=0.0).to(tl.float32)
    return s, z


@triton.jit
def scaled_sums(even, odd):
    """Per group Σx' and Σx of the window-scaled inputs (even values × 256, odd × 16): [.., GROUPS, n]."""
    return tl.sum(even + odd, axis=1), tl.sum(even * (1.0 / 256.0) + odd * (1.0 / 16.0), axis=1)


@triton.jit
def _bytes_step(acc, p, x_ptrs, s_ptrs, z_ptrs, n_mask, ONE, EVEN_N: tl.constexpr, BF16_PAIRS: tl.constexpr):
    """acc += one step's products from the packed byte tile p [BLOCK_N, GROUPS, GROUP / 2]."""
    if BF16_PAIRS:
        xe, xo = pair_floats(tl.load(x_ptrs))
    else:
        xe = tl.load(x_ptrs).to(tl.float32)
        xo = tl.load(x_ptrs + 1).to(tl.float32)
    xe = xe * 256.0
    xo = xo * 16.0
    fe, fo = window_floats(p.to(tl.int32), 0, ONE)
    fx = fe * xe[None, :, :] + fo * xo[None, :, :]
    sx_scaled, sx = scaled_sums(xe, xo)
    return group_affine(acc, tl.sum(fx, axis=2), sx_scaled, sx, s_ptrs, z_ptrs, n_mask, EVEN_N)


@triton.jit
def word_inputs(pairs):
    """A bf16 input as int32 pairs [A, B, 4] (a word's eight values: pairs 4w .. 4w + 3) → x0..x7 [A, B]:
    value j of each word, even j × 256, odd j × 16."""
    A: tl.constexpr = pairs.shape[0]
    B: tl.constexpr = pairs.shape[1]
    low, high = tl.split(tl.reshape(pairs, (A, B, 2, 2)))  # pairs 0, 2 and 1, 3 of each word
    p0, p2 = tl.split(low)
    p1, p3 = tl.split(high)
    x0, x1 = pair_floats(p0)
    x2, x3 = pair_floats(p1)
    x4, x5 = pair_floats(p2)
    x6, x7 = pair_floats(p3)
    x0, x2, x4, x6 = x0 * 256.0, x2 * 256.0, x4 * 256.0, x6 * 256.0
    x1, x3, x5, x7 = x1 * 16.0, x3 * 16.0, x5 * 16.0, x7 * 16.0
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def word_sums(x0, x1, x2, x3, x4, x5, x6, x7):
    """Per row of word_inputs' [A, B]: Σx' and Σx."""
    return scaled_sums((x0 + x2) + (x4 + x6), (x1 + x3) + (x5 + x7))


@triton.jit
def word_products(w, x0, x1, x2, x3, x4, x5, x6, x7, ONE):
    """Σ over each int32 word of w [.., A, B] of f_j · x_j (its eight nibbles as window floats)."""
    f0, f1 = window_floats(w, 0, ONE)
    f2, f3 = window_floats(w, 8, ONE)
    f4, f5 = window_floats(w, 16, ONE)
    f6, f7 = window_floats(w, 24, ONE)
    return (f0 * x0[None] + f1 * x1[None] + f2 * x2[None] + f3 * x3[None]
            + f4 * x4[None] + f5 * x5[None] + f6 * x6[None] + f7 * x7[None])


@triton.jit
def _words_step(acc, w, x_ptrs, s_ptrs, z_ptrs, n_mask, ONE, EVEN_N: tl.constexpr):
    """acc += one step's products from the packed word tile w [BLOCK_N, GROUPS, GROUP / 8]."""
    x0, x1, x2, x3, x4, x5, x6, x7 = word_inputs(tl.load(x_ptrs))
    fx = word_products(w, x0, x1, x2, x3, x4, x5, x6, x7, ONE)
    sx_scaled, sx = word_sums(x0, x1, x2, x3, x4, x5, x6, x7)
    return group_affine(acc, tl.sum(fx, axis=2), sx_scaled, sx, s_ptrs, z_ptrs, n_mask, EVEN_N)


@triton.jit
def _w4a16_gemv_bytes_kernel(
    x_ptr, p_ptr, s_ptr, z_ptr, out_ptr, part_ptr, arrivals_ptr, N, K, stride_pn, stride_sn,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    ONE, EVEN_N: tl.constexpr, BF16_PAIRS: tl.constexpr, USE_PDL: tl.constexpr, MERGE: tl.constexpr = False,
):
    GROUPS: tl.constexpr = BLOCK_K // GROUP
    HALF_G: tl.constexpr = GROUP // 2
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_g = tl.arange(0, GROUPS)
    byte = offs_g[:, None] * HALF_G + tl.arange(0, HALF_G)[None, :]  # [GROUPS, HALF_G] within the tile
    k_per_split = K // SPLIT_K  # the wrapper guarantees K % (SPLIT_K * BLOCK_K) == 0
    k_start = tl.multiple_of(pid_k * k_per_split, BLOCK_K)  # lets the loads below vectorize to 16 B
    rows = offs_n[:, None].to(tl.int64)
    n_mask = offs_n[:, None] < N
    p_ptrs = p_ptr + rows[:, :, None] * stride_pn + (k_start // 2 + byte)[None, :, :]
    s_ptrs = s_ptr + rows * stride_sn + (k_start // GROUP + offs_g)[None, :]
    z_ptrs = z_ptr + rows * stride_sn + (k_start // GROUP + offs_g)[None, :]
    if BF16_PAIRS:  # x_ptr: the bf16 input seen as int32 pairs, pair b = values 2b (low half), 2b + 1
        x_ptrs = x_ptr + k_start // 2 + byte
    else:
        x_ptrs = x_ptr + k_start + 2 * byte
    acc = tl.zeros((BLOCK_N, GROUPS), dtype=tl.float32)
    # the first weight tile streams in while the kernel before drains (weights never change: kernels/pdl.py)
    p = first_weight_tile(p_ptrs, n_mask[:, :, None], EVEN_N, USE_PDL)
    acc = _bytes_step(acc, p, x_ptrs, s_ptrs, z_ptrs, n_mask, ONE, EVEN_N, BF16_PAIRS)
    for _ in range(BLOCK_K, k_per_split, BLOCK_K):
        p_ptrs += BLOCK_K // 2
        if BF16_PAIRS:
            x_ptrs += BLOCK_K // 2
        else:
            x_ptrs += BLOCK_K
        s_ptrs += GROUPS
        z_ptrs += GROUPS
        acc = _bytes_step(acc, weight_tile(p_ptrs, n_mask[:, :, None], EVEN_N), x_ptrs, s_ptrs, z_ptrs,
                          n_mask, ONE, EVEN_N, BF16_PAIRS)
    store_rows(out_ptr, tl.sum(acc, axis=1)[:, None], tl.arange(0, 1), offs_n, 1, N, 0, SPLIT_K,
               MERGE, part_ptr, arrivals_ptr)


@triton.jit
def _w4a16_gemv_words_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, part_ptr, arrivals_ptr, N, K, stride_wn, stride_sn,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    ONE, EVEN_N: tl.constexpr, USE_PDL: tl.constexpr, MERGE: tl.constexpr = False,
):
    GROUPS: tl.constexpr = BLOCK_K // GROUP
    WORDS: tl.constexpr = GROUP // 8  # int32 words a group
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_g = tl.arange(0, GROUPS)
    word = offs_g[:, None] * WORDS + tl.arange(0, WORDS)[None, :]  # [GROUPS, WORDS] within the tile
    k_per_split = K // SPLIT_K  # the wrapper guarantees K % (SPLIT_K * BLOCK_K) == 0
    k_start = tl.multiple_of(pid_k * k_per_split, BLOCK_K)  # lets the loads below vectorize to 16 B
    rows = offs_n[:, None].to(tl.int64)
    n_mask = offs_n[:, None] < N
    w_ptrs = w_ptr + rows[:, :, None] * stride_wn + (k_start // 8 + word)[None, :, :]
    s_ptrs = s_ptr + rows * stride_sn + (k_start // GROUP + offs_g)[None, :]
    z_ptrs = z_ptr + rows * stride_sn + (k_start // GROUP + offs_g)[None, :]
    # the bf16 input as int32 pairs: a word's eight values are the four pairs 4w .. 4w + 3, one 16-byte load
    x_ptrs = x_ptr + k_start // 2 + 4 * word[:, :, None] + tl.arange(0, 4)[None, None, :]
    acc = tl.zeros((BLOCK_N, GROUPS), dtype=tl.float32)
    w = first_weight_tile(w_ptrs, n_mask[:, :, None], EVEN_N, USE_PDL)
    acc = _words_step(acc, w, x_ptrs, s_ptrs, z_ptrs, n_mask, ONE, EVEN_N)
    for _ in range(BLOCK_K, k_per_split, BLOCK_K):
        w_ptrs += BLOCK_K // 8
        x_ptrs += BLOCK_K // 2
        s_ptrs += GROUPS
        z_ptrs += GROUPS
        acc = _words_step(acc, weight_tile(w_ptrs, n_mask[:, :, None], EVEN_N), x_ptrs, s_ptrs, z_ptrs,
                          n_mask, ONE, EVEN_N)
    store_rows(out_ptr, tl.sum(acc, axis=1)[:, None], tl.arange(0, 1), offs_n, 1, N, 0, SPLIT_K,
               MERGE, part_ptr, arrivals_ptr)
