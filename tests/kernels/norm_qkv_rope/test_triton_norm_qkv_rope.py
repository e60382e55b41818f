"""Norm + qkv + rotary + KV store of one decode row in one kernel equals the reference."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.timeout(120)


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
