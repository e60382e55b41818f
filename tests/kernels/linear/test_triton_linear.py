"""Triton skinny GEMM equals F.linear (interpreted on CPU); shapes it does not serve go to F.linear."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.linear.config import SkinnyConfig
from kernels.linear.kernel import linear_triton, skinny_linear

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("config", [
    SkinnyConfig(block_n=16, block_k=32, num_warps=1, num_stages=1),
    SkinnyConfig(block_n=32, block_k=16, num_warps=1, num_stages=1, split_k=2),
])
def test_skinny_gemm_matches_f_linear(rows: int, config: SkinnyConfig) -> None:
    gen = torch.Generator().manual_seed(rows * config.block_n)
    n, k = 40, 64  # N not a multiple of block_n: the ragged last row block is masked
    x = torch.randn(rows, k, generator=gen)
    weight = torch.randn(n, k, generator=gen)
    torch.testing.assert_close(skinny_linear(x, weight, config), F.linear(x, weight), atol=1e-4, rtol=1e-4)


def test_leading_dims_and_strided_weight_rows_keep_the_linear_contract() -> None:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 1, 32, generator=gen)
    wide = torch.randn(16, 48, generator=gen)
    weight = wide[:, :32]  # row stride 48, unit column stride
    got = skinny_linear(x, weight, SkinnyConfig(block_n=16, block_k=16, num_warps=1, num_stages=1))
    assert got.shape == (2, 1, 16)
    torch.testing.assert_close(got, F.linear(x, weight), atol=1e-4, rtol=1e-4)


def test_many_rows_and_uneven_k_go_to_f_linear_unchanged() -> None:
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(16, 40, generator=gen)
    many = torch.randn(17, 40, generator=gen)  # past SKINNY_MAX_M rows
    assert torch.equal(linear_triton(many, weight), F.linear(many, weight))
    one = torch.randn(1, 40, generator=gen)  # K = 40: no K tile of 16 or more divides it
    assert torch.equal(linear_triton(one, weight), F.linear(one, weight))


def test_small_k_picks_a_k_tile_that_divides_it() -> None:
    from kernels.linear.config import pick_config

    config = pick_config(1, 3072, 576)  # SmolLM2's gate_up
    assert 576 % config.block_k == 0 and config.block_k >= 16
    gen = torch.Generator().manual_seed(5)
    x, weight = torch.randn(1, 96, generator=gen), torch.randn(8, 96, generator=gen)
    torch.testing.assert_close(linear_triton(x, weight), F.linear(x, weight), atol=1e-4, rtol=1e-4)
