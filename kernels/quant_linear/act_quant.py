"""Per-token int8 activation quantization in Triton: rows as given, or the MLP's silu(gate) · up in one pass.

quantize_rows: one program per row reads it once (times the SmoothQuant 1/s when given, then rotated by the
block Walsh–Hadamard transform when a rotation block is given: reference.hadamard_blocks_ref's butterflies,
in registers), takes max|x| and writes int8 codes of x times the reciprocal of the fp32 scale
max|x| · fp32(1/127).
Both kernels launch without floating-point fusion: a product 1/s · x fed to a butterfly's sum would
otherwise become one FMA, rounded once where the reference rounds twice, and the codes move off the
reference's wherever a value sits near a rounding edge.
silu_mul_quantize_rows does the same for the down projection's input straight from gate_up [T, 2I]: the
silu and the product are rounded to gate_up's dtype as kernels/activation rounds them, so the codes are
those of silu_mul then quantize_rows, without the 16-bit [T, I] activation written and read back or a
second launch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.pdl import pdl_launch, pdl_release, pdl_wait
from kernels.quant_linear.reference import INV_INT8_MAX, hadamard_log2

_TINY = torch.finfo(torch.float32).tiny
_INV_INT8_MAX = tl.constexpr(INV_INT8_MAX)  # fp32(1/127), the reference's factor


@triton.jit
def hadamard_blocks(x, BLOCK_K: tl.constexpr, LOG2_BLOCK: tl.constexpr):
    """x [BLOCK_K] times the block Walsh–Hadamard matrix of 2^LOG2_BLOCK: the butterflies of
    reference.hadamard_blocks_ref (pairs h apart → a + b, a − b; h = 1, 2, …), in the same order."""
    for stage in tl.static_range(LOG2_BLOCK):  # pairs h = 2^stage apart
        pairs = tl.permute(tl.reshape(x, [BLOCK_K >> (stage + 1), 2, 1 << stage]), (0, 2, 1))  # [.., h, 2]
        a, b = tl.split(pairs)
        x = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 2, 1)), [BLOCK_K])
    return x


@triton.jit
def quantize_row(x, mask, inv_smooth_ptr, offs, q_row_ptr, scale_ptr, row, SMOOTH: tl.constexpr,
                 TINY: tl.constexpr, BLOCK_K: tl.constexpr, LOG2_ROTATION: tl.constexpr):
    """Stores one fp32 row x (· 1/s, then rotated) as int8 codes at q_row_ptr + offs and its scale at
    scale_ptr + row. Rotation blocks divide K: the masked tail past K stays zero."""
    if SMOOTH:
        x *= tl.load(inv_smooth_ptr + offs, mask=mask, other=0.0)
    if LOG2_ROTATION > 0:
        x = hadamard_blocks(x, BLOCK_K, LOG2_ROTATION)
    # The reference's operations (no fusion, module docstring): max · fp32(1/127), then one IEEE division a
    # row (Triton's `/` is the approximate div.full.f32), so codes and scale are its bits.
    scale = tl.maximum(tl.max(tl.abs(x), axis=0) * _INV_INT8_MAX, TINY)
    y = x * tl.math.div_rn(1.0, scale)
    q = tl.where(y >= 0, tl.floor(y + 0.5), -tl.floor(0.5 - y))  # half away from zero, as the reference
    q = tl.minimum(tl.maximum(q, -127.0), 127.0)
    tl.store(q_row_ptr + offs, q.to(tl.int8), mask=mask)
    tl.store(scale_ptr + row, scale)


@triton.jit
def _quantize_rows_kernel(x_ptr, inv_smooth_ptr, q_ptr, scale_ptr, K, stride_xm, stride_qm,
                          BLOCK_K: tl.constexpr, SMOOTH: tl.constexpr, TINY: tl.constexpr,
                          LOG2_ROTATION: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)
    mask = offs < K
    x = tl.load(x_ptr + row.to(tl.int64) * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    quantize_row(x, mask, inv_smooth_ptr, offs, q_ptr + row.to(tl.int64) * stride_qm, scale_ptr, row,
                 SMOOTH, TINY, BLOCK_K, LOG2_ROTATION)


@triton.jit
def _silu_mul_quantize_kernel(gate_up_ptr, inv_smooth_ptr, q_ptr, scale_ptr, inter, stride_gt, stride_qt,
                              BLOCK_K: tl.constexpr, SMOOTH: tl.constexpr, TINY: tl.constexpr,
                              LOG2_ROTATION: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)  # gate_up comes from the kernel before (kernels/pdl.py), as silu_mul's does
    pdl_release(USE_PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)
    mask = offs < inter
    gate_up_row = gate_up_ptr + row.to(tl.int64) * stride_gt
    gate = tl.load(gate_up_row + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_row + inter + offs, mask=mask, other=0.0).to(tl.float32)
    dtype = gate_up_ptr.dtype.element_ty
    # silu(g) = g · sigmoid(g) and its product with up, each rounded to gate_up's dtype as silu_mul_ref's
    # torch ops round them: the same codes the two-kernel path (silu_mul, quantize_rows) writes.
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    x = (act * up).to(dtype).to(tl.float32)
    quantize_row(x, mask, inv_smooth_ptr, offs, q_ptr + row.to(tl.int64) * stride_qt, scale_ptr, row,
                 SMOOTH, TINY, BLOCK_K, LOG2_ROTATION)


def _row_warps(block_k: int) -> int:
    return max(1, min(16, block_k // 1024))  # ~32 values a thread: a whole row in registers


def quantize_rows(x: torch.Tensor, inv_smooth: torch.Tensor | None = None,
                  rotation_block: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] → (int8 [M, K], float32 scale [M]), reference.quantize_rows_ref's contract."""
    m, k = x.shape
    log2_rotation = hadamard_log2(rotation_block, k)
    if x.stride(1) != 1:
        x = x.contiguous()
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    block_k = triton.next_power_of_2(k)
    if m:
        _quantize_rows_kernel[(m,)](
            x, inv_smooth if inv_smooth is not None else x, q, scale, k, x.stride(0), q.stride(0),
            BLOCK_K=block_k, SMOOTH=inv_smooth is not None, TINY=_TINY, LOG2_ROTATION=log2_rotation,
            num_warps=_row_warps(block_k), enable_fp_fusion=False,
        )
    return q, scale


def silu_mul_quantize_rows(gate_up: torch.Tensor, inv_smooth: torch.Tensor | None = None,
                           num_warps: int | None = None, rotation_block: int = 1
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_up [..., 2I] → (int8 [T, I], float32 scale [T]) over its T rows; the contract of
    reference.silu_mul_quantize_rows_ref (silu_mul_ref, then quantize_rows_ref). `num_warps`: the bench's
    sweep (a whole row sits in registers: more warps, fewer registers a thread); default as quantize_rows."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"silu_mul_quantize_rows: gate_up must be [..., 2I], got {tuple(gate_up.shape)}")
    inter = gate_up.shape[-1] // 2
    log2_rotation = hadamard_log2(rotation_block, inter)
    rows = gate_up.reshape(-1, 2 * inter)
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    tokens = rows.shape[0]
    q = torch.empty((tokens, inter), dtype=torch.int8, device=rows.device)
    scale = torch.empty(tokens, dtype=torch.float32, device=rows.device)
    block_k = triton.next_power_of_2(inter)
    if tokens:
        _silu_mul_quantize_kernel[(tokens,)](
            rows, inv_smooth if inv_smooth is not None else rows, q, scale, inter, rows.stride(0),
            q.stride(0), BLOCK_K=block_k, SMOOTH=inv_smooth is not None, TINY=_TINY,
            LOG2_ROTATION=log2_rotation, num_warps=num_warps or _row_warps(block_k), enable_fp_fusion=False,
            **pdl_launch(rows.device),
        )
    return q, scale
