"""Triton RMSNorm fused with the optional residual add (rms_norm_ref's signature, numerics, returns)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.pdl import pdl_launch, pdl_release, pdl_wait


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    stride_x, stride_res, stride_out, stride_res_out,
    eps,
    HIDDEN: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)  # x and the residual come from the kernels before (kernels/pdl.py)
    pdl_release(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < HIDDEN
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + offs, mask=mask, other=0.0)
        # Round the sum to x's dtype before normalizing, as the reference's `x + residual` does.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_res_out + offs, x, mask=mask)
    h = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / HIDDEN + eps)
    # Cast back to x's dtype before the weight multiply (HF Llama's order), then multiply in the output dtype.
    normed = (h * rstd).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    out = normed.to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _as_rows(x: torch.Tensor, hidden: int) -> torch.Tensor:
    rows = x.reshape(-1, hidden)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Without `residual`: norm(x). With it: s = x + residual, returns (norm(s), s) — the new residual.

    One program per row; inputs are never modified (the reference returns fresh tensors, so does this).
    """
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not match hidden size {hidden}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual {tuple(residual.shape)} != x {tuple(x.shape)}")
    # torch's `weight * h.to(x.dtype)` promotes: an fp32 weight over bf16 activations gives fp32 out.
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    if residual is not None and residual.dtype != x.dtype:
        # `x + residual` promotes too; keep exactly that dtype for the new residual.
        x = x.to(torch.promote_types(x.dtype, residual.dtype))
        out_dtype = torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    new_res = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else None
    num_rows = x.numel() // hidden if hidden else 0
    if num_rows == 0:
        return out if residual is None else (out, new_res)
    x_rows = _as_rows(x, hidden)
    res_rows = _as_rows(residual, hidden) if residual is not None else x_rows
    out_rows = out.view(-1, hidden)
    res_out_rows = new_res.view(-1, hidden) if new_res is not None else out_rows
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(num_rows,)](
        x_rows, res_rows, weight.contiguous(), out_rows, res_out_rows,
        x_rows.stride(0), res_rows.stride(0), out_rows.stride(0), res_out_rows.stride(0),
        eps,
        HIDDEN=hidden, BLOCK=block, HAS_RESIDUAL=residual is not None,
        num_warps=min(max(block // 512, 1), 16), **pdl_launch(x.device),
    )
    return out if residual is None else (out, new_res)


def rms_norm_and_residual_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual); without a residual (the first layer) x itself is the residual."""
    if residual is None:
        return rms_norm_triton(x, weight, eps), x
    return rms_norm_triton(x, weight, eps, residual)
