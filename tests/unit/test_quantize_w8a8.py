"""W8A8: int8 round trips, exact int8 products on CPU, SmoothQuant keeps outlier-channel linears close."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.quantize import w8a8
from engine.quantize.w8a8 import (
    W8A8Linear,
    quantize_per_channel,
    quantize_per_token,
    smoothing_factors,
)

pytestmark = pytest.mark.timeout(60)


def test_per_channel_and_per_token_round_trips_within_half_a_step() -> None:
    w = torch.randn(32, 64)
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scale.shape == (32,)
    assert bool(((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all())
    x = torch.randn(5, 64) * 3
    qx, sx = quantize_per_token(x)
    assert bool((qx == qx.round()).all()) and float(qx.abs().max()) <= 127
    assert bool(((qx * sx - x).abs() <= sx / 2 + 1e-6).all())


def test_cpu_int8_products_equal_torch_int_mm() -> None:
    """The CPU path's fp32 GEMM over int8 values is exact: it equals torch._int_mm's int32 result."""
    linear = W8A8Linear(torch.randn(24, 96), torch.ones(96))
    qx = torch.randint(-127, 128, (4, 96)).float()
    exact = torch._int_mm(qx.to(torch.int8), linear.weight_int8.t())
    assert torch.equal(linear._int8_products(qx), exact.float())


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize(("rows", "in_features"), [(1, 576), (1, 1536), (3, 1536)])
def test_cpu_int8_products_are_exact_with_and_without_fbgemm(monkeypatch: pytest.MonkeyPatch, packed: bool,
                                                             rows: int, in_features: int) -> None:
    """FBGEMM's fp16-weight GEMM (int8 values are exact in fp16) and the fallback both give the int32 sums."""
    if not packed:
        monkeypatch.setattr(w8a8, "pack_fp16_weight", lambda weight: None)
    linear = W8A8Linear(torch.randn(40, in_features), torch.ones(in_features))
    qx = torch.randint(-127, 128, (rows, in_features)).float()
    exact = (qx.double() @ linear.weight_int8.double().t()).float()  # integers far below 2^53: exact
    assert torch.equal(linear._int8_products(qx), exact)
    assert (linear._cpu_pack is not None) == packed


def outlier_activations(rows: int, cols: int) -> torch.Tensor:
    x = torch.randn(rows, cols)
    x[:, :4] *= 40  # a few outlier channels, as LLM activations have
    return x


def test_w8a8_linear_close_to_float_and_smoothing_helps_outliers() -> None:
    torch.manual_seed(0)
    weight = torch.randn(128, 256) * 0.05
    calib, x = outlier_activations(256, 256), outlier_activations(16, 256)
    ref = F.linear(x, weight)

    def rel_error(linear: W8A8Linear) -> float:
        return ((linear(x) - ref).norm() / ref.norm()).item()

    smoothed = rel_error(W8A8Linear(weight, smoothing_factors(calib.abs().amax(0), weight)))
    plain = rel_error(W8A8Linear(weight, torch.ones(256)))
    assert smoothed <= 0.02  # the stated bound: 2% relative (Frobenius) error on outlier activations
    assert smoothed < plain


def test_down_projection_applies_silu_mul_first() -> None:
    weight = torch.randn(16, 64)
    gate_up = torch.randn(3, 128)
    plain = W8A8Linear(weight, torch.ones(64))(F.silu(gate_up[:, :64]) * gate_up[:, 64:])
    torch.testing.assert_close(W8A8Linear(weight, torch.ones(64), silu_mul_input=True)(gate_up), plain)
