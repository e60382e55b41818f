"""Triton skinny GEMM equals F.linear and Triton silu_mul equals silu_mul_ref (interpreted on CPU)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.activation.kernel import silu_mul_triton
from kernels.activation.reference import silu_mul_ref
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


@pytest.mark.parametrize("tokens,inter", [(1, 8), (3, 40)])
def test_silu_mul_matches_reference(tokens: int, inter: int) -> None:
    gen = torch.Generator().manual_seed(tokens * inter)
    gate_up = torch.randn(tokens, 2 * inter, generator=gen) * 4
    torch.testing.assert_close(silu_mul_triton(gate_up), silu_mul_ref(gate_up), atol=1e-5, rtol=1e-5)


def test_silu_mul_rejects_odd_width() -> None:
    with pytest.raises(ValueError, match="silu_mul"):
        silu_mul_triton(torch.ones(2, 7))


def test_small_k_picks_a_k_tile_that_divides_it() -> None:
    from kernels.linear.config import pick_config

    config = pick_config(1, 3072, 576)  # SmolLM2's gate_up
    assert 576 % config.block_k == 0 and config.block_k >= 16
    gen = torch.Generator().manual_seed(5)
    x, weight = torch.randn(1, 96, generator=gen), torch.randn(8, 96, generator=gen)
    torch.testing.assert_close(linear_triton(x, weight), F.linear(x, weight), atol=1e-4, rtol=1e-4)


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


def test_norm_linear_dispatch_entry_serves_several_rows_through_the_unfused_kernels() -> None:
    from kernels.norm_linear.kernel import rms_norm_linear_triton
    from kernels.norm_linear.reference import rms_norm_linear_ref

    gen = torch.Generator().manual_seed(1)
    x, residual = torch.randn(3, 32, generator=gen), torch.randn(3, 32, generator=gen)
    norm_weight, weight = torch.randn(32, generator=gen), torch.randn(16, 32, generator=gen)
    got, got_res = rms_norm_linear_triton(x, residual, norm_weight, 1e-5, weight)
    ref, ref_res = rms_norm_linear_ref(x, residual, norm_weight, 1e-5, weight)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_res, ref_res)


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("slot", [5, -1])  # -1: a padding row stores no KV
def test_norm_qkv_rotary_store_in_one_kernel_matches_the_reference(with_residual: bool, slot: int) -> None:
    from kernels.norm_qkv_rope.kernel import fused_rms_norm_qkv_rotary_store, norm_qkv_rope_supported
    from kernels.norm_qkv_rope.reference import rms_norm_qkv_rotary_store_ref

    heads, kv_heads, head_dim, hidden = 4, 2, 8, 64
    gen = torch.Generator().manual_seed(slot + 2 * with_residual)
    x = torch.randn(1, hidden, generator=gen)
    residual = torch.randn(1, hidden, generator=gen) if with_residual else None
    norm_weight = torch.randn(hidden, generator=gen)
    weight = torch.randn((heads + 2 * kv_heads) * head_dim, hidden, generator=gen)
    cos, sin = torch.randn(1, head_dim // 2, generator=gen), torch.randn(1, head_dim // 2, generator=gen)
    caches = [torch.randn(3, 4, kv_heads, head_dim, generator=gen) for _ in range(2)]
    before = [c.clone() for c in caches]
    assert norm_qkv_rope_supported(x, norm_weight, weight, residual, head_dim, block_k=32)
    q, res = fused_rms_norm_qkv_rotary_store(x, residual, norm_weight, 1e-5, weight, cos, sin, *caches,
                                             torch.tensor([slot]), heads, block_k=32)
    # The reference writes slot 5 of its own copies (a padding row's q is computed all the same).
    expected = [c.clone() for c in before]
    ref_q, ref_res = rms_norm_qkv_rotary_store_ref(x, residual, norm_weight, 1e-5, weight, cos, sin,
                                                   *expected, torch.tensor([5]), heads)
    torch.testing.assert_close(q, ref_q, atol=1e-4, rtol=1e-4)
    assert torch.equal(res, ref_res)
    for got, ref, old in zip(caches, expected, before, strict=True):
        torch.testing.assert_close(got, ref if slot >= 0 else old, atol=1e-4, rtol=1e-4)
