"""W8A8: int8 round trips, exact int8 products on CPU, SmoothQuant and the Hadamard rotation keep outlier-
channel linears close."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.quantize import w8a8
from engine.quantize.w8a8 import (
    W8A8Linear,
    quantize_per_channel,
    quantize_per_token,
    rotation_block,
    smoothing_factors,
)
from kernels.quant_linear.reference import hadamard_blocks_ref

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


def sylvester(block: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@pytest.mark.parametrize("block", [1, 2, 8, 64])
def test_hadamard_blocks_multiply_each_block_by_sylvesters_matrix(block: int) -> None:
    x = torch.randn(3, 2, 128, dtype=torch.float64)
    h = sylvester(block)
    expected = (x.reshape(3, 2, 128 // block, block) @ h).reshape(3, 2, 128)
    torch.testing.assert_close(hadamard_blocks_ref(x, block), expected)
    twice = hadamard_blocks_ref(hadamard_blocks_ref(x, block), block)
    torch.testing.assert_close(twice, x * block)  # H · H = block · I


@pytest.mark.parametrize("block", [0, 3, 48, 256])
def test_hadamard_blocks_refuse_a_block_that_is_no_power_of_two_dividing_k(block: int) -> None:
    with pytest.raises(ValueError, match=f"Hadamard block {block} must be a power of two dividing K = 96"):
        hadamard_blocks_ref(torch.randn(2, 96), block)


def test_rotation_block_is_the_largest_power_of_two_up_to_128_dividing_k() -> None:
    assert [rotation_block(k) for k in (576, 1536, 4096, 14336, 100, 7, 96)] == [64, 128, 128, 128, 4, 1, 32]


def test_w8a8_linear_close_to_float_and_smoothing_helps_outliers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(w8a8, "ROTATION_BLOCK", 1)  # SmoothQuant alone: the next test adds the rotation
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


def test_the_rotation_undoes_itself_and_lowers_the_error_on_outlier_tokens(monkeypatch: pytest.MonkeyPatch
                                                                          ) -> None:
    """A token's few large features set its one int8 scale; rotated, their mass spreads over their blocks."""
    torch.manual_seed(0)
    weight = torch.randn(128, 256) * 0.05
    calib, x = outlier_activations(256, 256), outlier_activations(16, 256)
    x[:, 100] *= 60  # an outlier channel calibration never saw: smoothing cannot move it
    ref = F.linear(x, weight)
    smooth = smoothing_factors(calib.abs().amax(0), weight)
    rotated = W8A8Linear(weight, smooth)
    assert rotated.rotation_block == 128
    monkeypatch.setattr(w8a8, "ROTATION_BLOCK", 1)
    unrotated = W8A8Linear(weight, smooth)
    errors = [((linear(x) - ref).norm() / ref.norm()).item() for linear in (rotated, unrotated)]
    assert errors[0] < 0.02 and errors[0] < errors[1] / 2, errors


def test_down_projection_applies_silu_mul_first() -> None:
    weight = torch.randn(16, 64)
    gate_up = torch.randn(3, 128)
    plain = W8A8Linear(weight, torch.ones(64))(F.silu(gate_up[:, :64]) * gate_up[:, 64:])
    torch.testing.assert_close(W8A8Linear(weight, torch.ones(64), silu_mul_input=True)(gate_up), plain)
