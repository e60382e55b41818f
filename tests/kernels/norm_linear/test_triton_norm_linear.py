"""RMSNorm fused into the one-row GEMV equals norm then linear; more rows take the unfused kernels."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("n", [8, 10])  # 10: a ragged last block of weight rows
def test_norm_fused_into_the_gemv_matches_norm_then_linear(with_residual: bool, n: int) -> None:
    from kernels.norm_linear.kernel import fused_rms_norm_linear, norm_linear_supported
    from kernels.norm_linear.reference import rms_norm_linear_ref

    gen = torch.Generator().manual_seed(n + with_residual)
    x = torch.randn(1, 64, generator=gen) * 3
    residual = torch.randn(1, 64, generator=gen) if with_residual else None
    norm_weight = torch.randn(64, generator=gen)
    weight = torch.randn(n, 64, generator=gen)
    assert norm_linear_supported(x, norm_weight, weight, residual, block_k=32)
    got, got_res = fused_rms_norm_linear(x, residual, norm_weight, 1e-5, weight, block_n=4, block_k=32)
    ref, ref_res = rms_norm_linear_ref(x, residual, norm_weight, 1e-5, weight)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(got_res, ref_res)


def test_norm_linear_op_serves_several_rows_through_the_unfused_kernels() -> None:
    from kernels.norm_linear.kernel import rms_norm_linear_triton
    from kernels.norm_linear.reference import rms_norm_linear_ref

    gen = torch.Generator().manual_seed(1)
    x, residual = torch.randn(3, 32, generator=gen), torch.randn(3, 32, generator=gen)
    norm_weight, weight = torch.randn(32, generator=gen), torch.randn(16, 32, generator=gen)
    got, got_res = rms_norm_linear_triton(x, residual, norm_weight, 1e-5, weight)
    ref, ref_res = rms_norm_linear_ref(x, residual, norm_weight, 1e-5, weight)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_res, ref_res)
