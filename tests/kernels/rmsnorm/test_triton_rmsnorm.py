"""Triton RMSNorm (+ fused residual add) equals rms_norm_ref in values, dtypes, returns (interpreted, CPU)."""
from __future__ import annotations

import pytest
import torch

from kernels.rmsnorm.kernel import rms_norm_triton
from kernels.rmsnorm.reference import rms_norm_ref

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("shape", [(1, 16), (7, 48), (3, 5, 64), (4, 576)])
def test_norm_without_residual_matches_reference(shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    x = 3 * torch.randn(*shape, generator=gen)
    weight = torch.randn(shape[-1], generator=gen)
    got = rms_norm_triton(x, weight, 1e-6)
    assert isinstance(got, torch.Tensor) and got.shape == x.shape
    torch.testing.assert_close(got, rms_norm_ref(x, weight, 1e-6), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(1, 16), (6, 100)])
def test_residual_add_returns_normed_sum_and_new_residual(shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(shape[1])
    x, residual = torch.randn(*shape, generator=gen), torch.randn(*shape, generator=gen)
    weight = torch.randn(shape[-1], generator=gen)
    x_before, res_before = x.clone(), residual.clone()
    out, new_residual = rms_norm_triton(x, weight, 1e-5, residual)
    ref_out, ref_residual = rms_norm_ref(x, weight, 1e-5, residual)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    assert torch.equal(new_residual, ref_residual)
    # Inputs stay as they were: callers may still hold them.
    assert torch.equal(x, x_before) and torch.equal(residual, res_before)


def test_half_activations_with_fp32_weight_promote_like_reference() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 32, generator=gen).half()
    residual = torch.randn(3, 32, generator=gen).half()
    weight = torch.randn(32, generator=gen)
    out, new_residual = rms_norm_triton(x, weight, 1e-5, residual)
    ref_out, ref_residual = rms_norm_ref(x, weight, 1e-5, residual)
    assert out.dtype == ref_out.dtype == torch.float32 and new_residual.dtype == torch.float16
    torch.testing.assert_close(out, ref_out, atol=1e-3, rtol=1e-3)
    assert torch.equal(new_residual, ref_residual)


def test_strided_rows_match_reference() -> None:
    x = torch.randn(4, 64)[:, :32]  # row stride 64, hidden 32
    weight = torch.rand(32)
    torch.testing.assert_close(rms_norm_triton(x, weight, 1e-5), rms_norm_ref(x, weight, 1e-5),
                               atol=1e-5, rtol=1e-5)


def test_wrong_weight_shape_raises_value_error() -> None:
    with pytest.raises(ValueError):
        rms_norm_triton(torch.ones(2, 16), torch.ones(8), 1e-5)
