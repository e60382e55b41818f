"""The gated GEMM (silu(gate) · up in the gate_up epilogue) and the MLP op equal their references."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.activation.reference import silu_mul_ref
from kernels.norm_mlp.reference import rms_norm_mlp_ref

pytestmark = pytest.mark.timeout(120)

HIDDEN, INTER = 64, 80  # INTER not a multiple of the tile: the ragged last row block is masked


def _weights(seed: int, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    gate_up = (torch.randn(2 * INTER, HIDDEN, generator=gen) / HIDDEN ** 0.5).to(dtype)
    down = (torch.randn(HIDDEN, INTER, generator=gen) / INTER ** 0.5).to(dtype)
    return gate_up, down


@pytest.mark.parametrize("rows", [2, 7, 16])
def test_gated_linear_equals_linear_then_silu_mul(rows: int) -> None:
    from kernels.norm_mlp.kernel import gated_linear, gated_supported

    gate_up, _ = _weights(rows)
    x = torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(100 + rows))
    assert gated_supported(x, gate_up)
    torch.testing.assert_close(gated_linear(x, gate_up), silu_mul_ref(F.linear(x, gate_up)),
                               atol=1e-5, rtol=1e-4)


def test_gated_linear_rounds_like_the_unfused_half_precision_path() -> None:
    """fp16 here (the interpreter's bf16 tl.dot is wrong in triton 3.9); bf16 runs in tests/gpu."""
    from kernels.norm_mlp.kernel import gated_linear

    gate_up, _ = _weights(3, torch.float16)
    x = torch.randn(4, HIDDEN, generator=torch.Generator().manual_seed(4)).to(torch.float16)
    got = gated_linear(x, gate_up).float()
    ref = silu_mul_ref(F.linear(x.float(), gate_up.float()).to(torch.float16)).float()
    # Products summed in another order can round to a neighbouring fp16 value; nothing beyond that.
    torch.testing.assert_close(got, ref, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize(("rows", "with_residual"), [(1, True), (3, False), (5, True), (20, True)])
def test_rms_norm_mlp_matches_the_reference_on_every_path(rows: int, with_residual: bool) -> None:
    """1 row: fused norm GEMV + SiLU prologue; 2-16: norm + gated GEMM + down; more: unfused."""
    from kernels.norm_mlp.kernel import rms_norm_mlp_triton

    gate_up, down = _weights(10 + rows)
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, HIDDEN, generator=gen)
    residual = torch.randn(rows, HIDDEN, generator=gen) if with_residual else None
    norm_weight = torch.randn(HIDDEN, generator=gen)
    got, got_res = rms_norm_mlp_triton(x, residual, norm_weight, 1e-5, gate_up, down)
    ref, ref_res = rms_norm_mlp_ref(x, residual, norm_weight, 1e-5, gate_up, down)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_res, ref_res)


def test_shapes_it_does_not_serve_are_refused() -> None:
    from kernels.norm_mlp.kernel import gated_supported

    gate_up, _ = _weights(1)
    assert not gated_supported(torch.randn(1, HIDDEN), gate_up)  # one row: the GEMV path
    assert not gated_supported(torch.randn(17, HIDDEN), gate_up)  # past the skinny GEMM: cuBLAS
    assert not gated_supported(torch.randn(4, HIDDEN - 1), gate_up)  # wrong width
