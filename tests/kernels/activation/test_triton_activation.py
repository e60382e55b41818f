"""Triton silu_mul equals silu_mul_ref (interpreted on CPU) and refuses odd widths."""
from __future__ import annotations

import pytest
import torch

from kernels.activation.kernel import silu_mul_triton
from kernels.activation.reference import silu_mul_ref

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("tokens,inter", [(1, 8), (3, 40)])
def test_silu_mul_matches_reference(tokens: int, inter: int) -> None:
    gen = torch.Generator().manual_seed(tokens * inter)
    gate_up = torch.randn(tokens, 2 * inter, generator=gen) * 4
    torch.testing.assert_close(silu_mul_triton(gate_up), silu_mul_ref(gate_up), atol=1e-5, rtol=1e-5)


def test_silu_mul_rejects_odd_width() -> None:
    with pytest.raises(ValueError, match="silu_mul"):
        silu_mul_triton(torch.ones(2, 7))
