"""W8A8: per-output-channel int8 weights, per-token dynamic int8 activations, SmoothQuant smoothing factors
and a block Hadamard rotation of every projection's input.

y = (q_x · q_wᵀ) · a_x · a_w, with x' = (x / s) · H and w' = (w · s) · H / b first: s per input feature
(SmoothQuant) moves activation outliers into the weights, where per-channel scales absorb them; H, the block-
diagonal Walsh–Hadamard matrix of b (entries ±1, H · H = b · I, so x' · w'ᵀ = x · wᵀ), spreads what outliers
are left in a token over the b features of their block, so its one int8 scale is no longer set by a few
features (QuaRot's idea, online and per projection: no weight outside the projection changes). b: the
largest power of two up to ROTATION_BLOCK dividing K (rotation_block). Measured on four texts it cut the KL
from the fp32 model 5× (docs/benchmarks.md). W8A8Linear is the CPU path (on
CUDA the kernel registry's w8a8_linear serves the scheme: engine/quantize/kernel_linears.py). On CPU torch's
`_int_mm` is a scalar loop on this AVX2 box (607 ms for a 512×576×1536 product vs 20 ms fp32), so the CPU
path multiplies the same int8 values with fp32 FMAs: every product (≤ 127²) is exact in fp32 and so is every
partial sum below 2^24, which holds for any K ≤ 1040 and, in practice, for K = 1536 too (it needs hundreds
of near-±127 pairs in one row). The weights' int8 values are exact in fp16, so the CPU GEMM is FBGEMM's
fp16-weight one (packed once, widened to fp32 in registers): half the bytes of an fp32 copy and no per-call
conversion (docs/benchmarks.md).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from kernels.activation.reference import silu_mul_ref
from kernels.quant_linear.reference import hadamard_blocks_ref

SMOOTHING_ALPHA = 0.5  # SmoothQuant's migration strength: s = max|x|^α / max|w|^(1−α)
ROTATION_BLOCK = 128  # the largest Hadamard block; the embedded model's K = 576 takes 64, its 1536 takes 128

logger = logging.getLogger(__name__)


def pack_fp16_weight(weight: torch.Tensor) -> object | None:
    """FBGEMM's packed fp16 copy of a CPU weight [N, K] for `quantized::linear_dynamic_fp16`; None, logged,
    where this torch build has no FBGEMM (the caller then runs an fp32 GEMM: same numbers, slower)."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        logger.warning("W8A8 on CPU: this torch has no FBGEMM; int8 products run as an fp32 GEMM over a "
                       "per-call fp32 copy of the weights (same numbers, ~3x slower)")
        return None
    return torch.ops.quantized.linear_prepack_fp16(weight.float(), None)


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float [N, K] → (int8 [N, K], scale [N]) symmetric per row: w ≈ q · scale, |error| ≤ scale / 2."""
    scale = (weight.float().abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    q = (weight.float() / scale.unsqueeze(1)).round_().clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float [M, K] → (int8-valued float32 [M, K], scale [M, 1]) symmetric per row (dynamic: every call)."""
    scale = (x.abs().amax(dim=1, keepdim=True) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    return (x / scale).round_().clamp_(-127, 127), scale


def rotation_block(in_features: int) -> int:
    """The Hadamard block of a K-input projection: the largest power of two ≤ ROTATION_BLOCK dividing K."""
    return min(ROTATION_BLOCK, in_features & -in_features)


def rotated_weight(weight: torch.Tensor, smooth: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(w · s) · H / b of a float weight [N, K] and its block b (rotation_block(K)), in float32."""
    block = rotation_block(weight.shape[1])
    return hadamard_blocks_ref(weight.double() * smooth.double(), block).div_(block).float(), block


def smoothing_factors(act_absmax: torch.Tensor, weight: torch.Tensor,
                      alpha: float = SMOOTHING_ALPHA) -> torch.Tensor:
    """SmoothQuant s [K] from calibrated per-input-feature max|x| [K] and the weight [N, K]."""
    w_absmax = weight.float().abs().amax(dim=0)
    s = act_absmax.float().clamp_min(1e-5).pow(alpha) / w_absmax.clamp_min(1e-5).pow(1 - alpha)
    return s.clamp_min(1e-5)


class W8A8Linear(nn.Module):
    """Bias-free linear with int8 weights and activations; `smooth` [K]: the SmoothQuant factors folded into
    the weight (the activations are divided by them, then rotated, before quantizing: module docstring).
    `silu_mul_input`: see Q41Linear."""

    def __init__(self, weight: torch.Tensor, smooth: torch.Tensor, silu_mul_input: bool = False) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.silu_mul_input = silu_mul_input
        rotated, self.rotation_block = rotated_weight(weight, smooth)
        q, scale = quantize_per_channel(rotated)
        self.register_buffer("weight_int8", q)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("inv_smooth", 1.0 / smooth.float())
        self._cpu_pack: object | None = None  # pack_fp16_weight(weight_int8), made by the first CPU call
        self._cpu_packed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.silu_mul_input:
            x = silu_mul_ref(x)
        rows = x.reshape(-1, self.in_features).float() * self.inv_smooth
        q_x, a_x = quantize_per_token(hadamard_blocks_ref(rows, self.rotation_block))
        y = self._int8_products(q_x) * a_x * self.weight_scale
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def _int8_products(self, q_x: torch.Tensor) -> torch.Tensor:
        """q_x · q_wᵀ (int8-valued float32 [M, K]) → float32 [M, N], exact (module docstring)."""
        if not self._cpu_packed:
            self._cpu_pack, self._cpu_packed = pack_fp16_weight(self.weight_int8), True
        if self._cpu_pack is None:
            return F.linear(q_x, self.weight_int8.float())
        return torch.ops.quantized.linear_dynamic_fp16(q_x, self._cpu_pack)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rotation={self.rotation_block}"
