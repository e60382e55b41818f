"""The multi-row qkv GEMM with rotary + KV store in its epilogue equals projection → rotary_store_kv_ref."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.timeout(120)

HEADS, KV_HEADS, HIDDEN = 4, 2, 64


def _inputs(rows: int, head_dim: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, HIDDEN, generator=gen)
    weight = torch.randn((HEADS + 2 * KV_HEADS) * head_dim, HIDDEN, generator=gen) / HIDDEN ** 0.5
    cos = torch.randn(rows, head_dim // 2, generator=gen)
    sin = torch.randn(rows, head_dim // 2, generator=gen)
    caches = [torch.randn(3, 4, KV_HEADS, head_dim, generator=gen) for _ in range(2)]
    return x, weight, cos, sin, caches


@pytest.mark.parametrize(("rows", "head_dim"), [(2, 8), (5, 16), (16, 8)])
def test_qkv_rotary_store_matches_projection_then_reference(rows: int, head_dim: int) -> None:
    from kernels.norm_qkv_rope.qkv_rope import qkv_rope_supported, qkv_rotary_store
    from kernels.rotary.reference import apply_rotary_ref
    from kernels.store_kv.reference import store_kv_ref

    x, weight, cos, sin, caches = _inputs(rows, head_dim, seed=rows + head_dim)
    # Distinct slots across blocks; row 1 is a padding row (slot -1): it stores no KV.
    slots = torch.tensor([(7 * i + 2) % 12 for i in range(rows)])
    slots[1] = -1
    heads = F.linear(x, weight).view(rows, HEADS + 2 * KV_HEADS, head_dim)
    q, k, v = heads.split_with_sizes([HEADS, KV_HEADS, KV_HEADS], dim=1)
    ref_q, ref_k = apply_rotary_ref(q, k, cos, sin)
    expected = [c.clone() for c in caches]
    keep = slots >= 0
    store_kv_ref(ref_k[keep], v[keep], *expected, slots[keep])

    assert qkv_rope_supported(x, weight, cos, sin, *caches, HEADS)
    got_q = qkv_rotary_store(x, weight, cos, sin, *caches, slots, HEADS)
    torch.testing.assert_close(got_q, ref_q, atol=1e-4, rtol=1e-4)
    for got, ref in zip(caches, expected, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_norm_qkv_rotary_store_takes_the_epilogue_path_for_a_few_rows() -> None:
    from kernels.norm_qkv_rope.kernel import rms_norm_qkv_rotary_store_triton
    from kernels.norm_qkv_rope.reference import rms_norm_qkv_rotary_store_ref

    rows, head_dim = 3, 8
    x, weight, cos, sin, caches = _inputs(rows, head_dim, seed=11)
    residual = torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(12))
    norm_weight = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(13))
    slots = torch.tensor([0, 5, 9])
    expected = [c.clone() for c in caches]
    ref_q, ref_res = rms_norm_qkv_rotary_store_ref(x, residual, norm_weight, 1e-5, weight, cos, sin,
                                                   *expected, slots, HEADS)
    q, res = rms_norm_qkv_rotary_store_triton(x, residual, norm_weight, 1e-5, weight, cos, sin, *caches,
                                              slots, HEADS)
    torch.testing.assert_close(q, ref_q, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(res, ref_res)
    for got, ref in zip(caches, expected, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_rows_it_does_not_serve_are_refused() -> None:
    from kernels.norm_qkv_rope.qkv_rope import qkv_rope_supported

    x, weight, cos, sin, caches = _inputs(1, 8, seed=3)
    assert not qkv_rope_supported(x, weight, cos, sin, *caches, HEADS)  # one row: the fused one-row kernel
    x17, weight, cos17, sin17, caches = _inputs(17, 8, seed=4)
    assert not qkv_rope_supported(x17, weight, cos17, sin17, *caches, HEADS)  # past the skinny GEMM
    x, weight, cos, sin, caches = _inputs(4, 8, seed=5)
    assert not qkv_rope_supported(x, weight[:-8], cos, sin, *caches, HEADS)  # not whole heads
