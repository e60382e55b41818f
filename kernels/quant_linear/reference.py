"""The quantized linears in torch (dequantize, fp32 matmul): what the Triton kernels are tested against."""
from __future__ import annotations

import torch

from kernels.activation.reference import silu_mul_ref
from kernels.quant_linear.layout import W4Weight, W8Weight, unpack_w4

INT8_MAX = 127
INV_INT8_MAX = torch.tensor(1.0 / INT8_MAX, dtype=torch.float32).item()  # 1/127 rounded to fp32
_TINY = torch.finfo(torch.float32).tiny


def dequantize_w4(weight: W4Weight) -> torch.Tensor:
    """float32 [N, K] = q · scale + low per group."""
    n, k = weight.shape
    q = unpack_w4(weight).float().reshape(n, -1, weight.group_size)
    w = q * weight.scale.float().unsqueeze(-1) + weight.low.float().unsqueeze(-1)
    return w.reshape(n, k)


def w4a16_linear_ref(x: torch.Tensor, weight: W4Weight) -> torch.Tensor:
    """x [..., K] → [..., N] in x's dtype, fp32 products over the dequantized weight."""
    return (x.float() @ dequantize_w4(weight).t()).to(x.dtype)


def w8_linear_ref(x: torch.Tensor, weight: W8Weight) -> torch.Tensor:
    """Weight-only int8: x [..., K] → [..., N] = x · (q · scale)ᵀ in fp32, out in x's dtype."""
    return ((x.float() @ weight.q.float().t()) * weight.scale.float()).to(x.dtype)


def hadamard_log2(block: int, k: int) -> int:
    """log2 of a Hadamard block that is a power of two dividing K; a ValueError naming both otherwise."""
    if block < 1 or block & (block - 1) or k % block:
        raise ValueError(f"Hadamard block {block} must be a power of two dividing K = {k}")
    return block.bit_length() - 1


def hadamard_blocks_ref(x: torch.Tensor, block: int) -> torch.Tensor:
    """x [..., K] times the block-diagonal Walsh–Hadamard matrix of `block` (a power of two dividing K):
    each run of `block` features times Sylvester's H (entries ±1, not normalized: H · H = block · I). The
    fast transform, one butterfly a stage (pairs h apart: a + b, a − b) for h = 1, 2, …, block / 2, in the
    order act_quant's kernel adds them, so both round alike. block 1: x unchanged."""
    hadamard_log2(block, x.shape[-1])
    shape, h = x.shape, 1
    y = x.reshape(-1, x.shape[-1])
    while h < block:
        pairs = y.view(y.shape[0], -1, 2, h)
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2).view(y.shape[0], -1)
        h *= 2
    return y.view(shape)


def quantize_rows_ref(x: torch.Tensor, inv_smooth: torch.Tensor | None = None, rotation_block: int = 1
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (times inv_smooth [K] first, then hadamard_blocks_ref of rotation_block) → (int8 [M, K],
    float32 scale [M] = max|x| · INV_INT8_MAX): symmetric per row, y = x · (1 / scale) rounded half away from
    zero as floor(|y| + 0.5) (the Triton kernel computes and rounds the same way)."""
    rows = x.float() if inv_smooth is None else x.float() * inv_smooth.float()
    rows = hadamard_blocks_ref(rows, rotation_block)
    # max · fp32(1/127), a product on every device (CUDA torch turns a division by a scalar into one)
    scale = (rows.abs().amax(dim=-1) * INV_INT8_MAX).clamp_min(_TINY)
    y = rows * (1.0 / scale).unsqueeze(-1)
    q = torch.sign(y) * torch.floor(y.abs() + 0.5)
    return q.clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def int8_gemm_ref(q_x: torch.Tensor, x_scale: torch.Tensor, weight: W8Weight,
                  out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(q_x int8 [M, K], x_scale [M]) · weightᵀ → [M, N]: exact int products (fp64), both scales after."""
    acc = q_x.double() @ weight.q.double().t()
    return (acc * x_scale.double().unsqueeze(-1) * weight.scale.double()).to(out_dtype)


def w8a8_linear_ref(x: torch.Tensor, weight: W8Weight, inv_smooth: torch.Tensor | None = None,
                    rotation_block: int = 1) -> torch.Tensor:
    """Per-token dynamic int8 activations × per-channel int8 weights → [M, N] in x's dtype; the weight is
    that of the rotated input when rotation_block > 1 (engine/quantize/w8a8.py)."""
    q_x, x_scale = quantize_rows_ref(x, inv_smooth, rotation_block)
    return int8_gemm_ref(q_x, x_scale, weight, x.dtype)


def silu_mul_quantize_rows_ref(gate_up: torch.Tensor, inv_smooth: torch.Tensor | None = None,
                               rotation_block: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The MLP's down-projection input quantized: gate_up [..., 2I] → silu(gate) · up in gate_up's dtype
    (silu_mul_ref) → quantize_rows_ref over its [T, I] rows."""
    act = silu_mul_ref(gate_up)
    return quantize_rows_ref(act.reshape(-1, act.shape[-1]), inv_smooth, rotation_block)


def silu_mul_w4a16_linear_ref(gate_up: torch.Tensor, weight: W4Weight) -> torch.Tensor:
    """W4A16 down projection fed gate_up [..., 2I]: w4a16_linear_ref of silu_mul_ref(gate_up), [..., N]."""
    return w4a16_linear_ref(silu_mul_ref(gate_up), weight)


def silu_mul_w8a8_linear_ref(gate_up: torch.Tensor, weight: W8Weight, inv_smooth: torch.Tensor | None = None,
                             rotation_block: int = 1) -> torch.Tensor:
    """W8A8 down projection fed gate_up [..., 2I]: w8a8_linear_ref of silu_mul_ref(gate_up), [..., N]."""
    return w8a8_linear_ref(silu_mul_ref(gate_up), weight, inv_smooth, rotation_block)
