"""Triton silu_mul (silu_mul_ref's contract): gate_up [T, 2I] → silu(gate) · up [T, I] in one pass."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.pdl import pdl_launch, pdl_release, pdl_wait


@triton.jit
def silu_mul_rounded(gate, up, DTYPE: tl.constexpr):
    """silu(gate) · up from fp32 gate and up, rounded as silu_mul_ref: silu to DTYPE before the product, the
    product to DTYPE (every fused prologue that takes gate_up computes it this way)."""
    act = (gate / (1.0 + tl.exp(-gate))).to(DTYPE).to(tl.float32)
    return (act * up).to(DTYPE)


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, inter, stride_gt, stride_ot, BLOCK: tl.constexpr,
                     USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)  # gate_up comes from the kernel before (kernels/pdl.py)
    pdl_release(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    gate = tl.load(gate_up_ptr + token * stride_gt + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + token * stride_gt + inter + offs, mask=mask, other=0.0).to(tl.float32)
    act = silu_mul_rounded(gate, up, out_ptr.dtype.element_ty)
    tl.store(out_ptr + token * stride_ot + offs, act, mask=mask)


def silu_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] → [T, I]; one program per (token, BLOCK of I)."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"silu_mul: gate_up must be [T, 2I], got {tuple(gate_up.shape)}")
    if gate_up.stride(1) != 1:
        gate_up = gate_up.contiguous()
    tokens, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((tokens, inter), dtype=gate_up.dtype, device=gate_up.device)
    if tokens == 0:
        return out
    block = min(1024, triton.next_power_of_2(inter))
    _silu_mul_kernel[(tokens, triton.cdiv(inter, block))](
        gate_up, out, inter, gate_up.stride(0), out.stride(0), BLOCK=block, num_warps=4,
        **pdl_launch(gate_up.device))
    return out
