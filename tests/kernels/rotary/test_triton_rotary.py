"""Triton rotary embedding equals apply_rotary_ref (rotate-half, GQA head counts), interpreted on CPU."""
from __future__ import annotations

import pytest
import torch

from engine.config import ModelConfig
from kernels.rotary.kernel import apply_rotary_triton
from kernels.rotary.reference import apply_rotary_ref

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 4, 16), (9, 3, 32), (8, 2, 24)])
def test_random_tables_match_reference(num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    gen = torch.Generator().manual_seed(num_heads * head_dim)
    tokens = 6
    q = torch.randn(tokens, num_heads, head_dim, generator=gen)
    k = torch.randn(tokens, num_kv_heads, head_dim, generator=gen)
    cos = torch.randn(tokens, head_dim // 2, generator=gen)
    sin = torch.randn(tokens, head_dim // 2, generator=gen)
    q_got, k_got = apply_rotary_triton(q, k, cos, sin)
    q_ref, k_ref = apply_rotary_ref(q, k, cos, sin)
    torch.testing.assert_close(q_got, q_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(k_got, k_ref, atol=1e-6, rtol=1e-6)


def test_real_rope_tables_on_fused_qkv_views_match_reference() -> None:
    from engine.rope import RotaryEmbedding

    config = ModelConfig(name="tiny", vocab_size=32, hidden_size=128, intermediate_size=256, num_layers=1,
                         num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=64,
                         rope_theta=500000.0)
    rope = RotaryEmbedding(config, max_positions=64)
    cos, sin = rope(torch.tensor([0, 1, 2, 17, 40, 63]))
    fused = torch.randn(6, (4 + 2 + 2) * 32)
    q = fused[:, :128].view(6, 4, 32)
    k = fused[:, 128:192].view(6, 2, 32)
    q_before = q.clone()
    q_got, k_got = apply_rotary_triton(q, k, cos, sin)
    q_ref, k_ref = apply_rotary_ref(q, k, cos, sin)
    torch.testing.assert_close(q_got, q_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(k_got, k_ref, atol=1e-6, rtol=1e-6)
    assert torch.equal(q, q_before)


def test_half_inputs_stay_within_one_ulp_of_reference() -> None:
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(3, 2, 16, generator=gen).half()
    k = torch.randn(3, 1, 16, generator=gen).half()
    cos, sin = torch.randn(3, 8, generator=gen).half(), torch.randn(3, 8, generator=gen).half()
    q_got, k_got = apply_rotary_triton(q, k, cos, sin)
    q_ref, k_ref = apply_rotary_ref(q, k, cos, sin)
    assert q_got.dtype == k_got.dtype == torch.float16
    # The kernel rounds once (fp32 math); the reference rounds after each product: at most an ulp apart.
    torch.testing.assert_close(q_got, q_ref, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(k_got, k_ref, atol=2e-3, rtol=1e-3)


def test_table_rows_must_match_tokens() -> None:
    with pytest.raises(ValueError):
        apply_rotary_triton(torch.ones(3, 2, 16), torch.ones(3, 1, 16), torch.ones(2, 8), torch.ones(2, 8))


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 2, 16), (6, 3, 24)])
def test_fused_rotary_store_kv_matches_rotary_then_store(num_heads: int, num_kv_heads: int,
                                                         head_dim: int) -> None:
    from kernels.rotary.kernel import rotary_store_kv_triton
    from kernels.rotary.reference import rotary_store_kv_ref

    gen = torch.Generator().manual_seed(num_heads + head_dim)
    tokens, num_blocks, block_size = 5, 4, 4
    # q, k, v as views of one fused qkv output, the way the model hands them over.
    heads = torch.randn(tokens, num_heads + 2 * num_kv_heads, head_dim, generator=gen)
    q, k, v = heads.split_with_sizes([num_heads, num_kv_heads, num_kv_heads], dim=1)
    cos = torch.randn(tokens, head_dim // 2, generator=gen)
    sin = torch.randn(tokens, head_dim // 2, generator=gen)
    slots = torch.tensor([3, 14, -1, 0, 9])  # -1: a padding token writes nothing
    caches = [torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen) for _ in range(2)]
    expected = [c.clone() for c in caches]
    keep = slots >= 0
    q_ref = rotary_store_kv_ref(q[keep], k[keep], v[keep], cos[keep], sin[keep], *expected, slots[keep])
    q_got = rotary_store_kv_triton(q, k, v, cos, sin, *caches, slots)
    torch.testing.assert_close(q_got[keep], q_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(caches[0], expected[0], atol=1e-6, rtol=1e-6)
    assert torch.equal(caches[1], expected[1])  # v is copied as is


def test_fused_rotary_store_kv_rejects_mismatched_cache() -> None:
    from kernels.rotary.kernel import rotary_store_kv_triton

    q, k = torch.ones(2, 4, 16), torch.ones(2, 2, 16)
    with pytest.raises(ValueError, match="rotary_store_kv"):
        rotary_store_kv_triton(q, k, k, torch.ones(2, 8), torch.ones(2, 8), torch.zeros(2, 4, 3, 16),
                               torch.zeros(2, 4, 3, 16), torch.tensor([0, 1]))


@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 2), (6, 3), (3, 3)])
@pytest.mark.parametrize("split_per_sm", [32, 0])
def test_rotary_store_kv_into_a_quantized_cache_matches_the_reference(
        dtype: str, num_heads: int, num_kv_heads: int, split_per_sm: int, monkeypatch) -> None:
    # whole rows quantized as they are stored: the same rotated q and the same stored bytes as the reference
    # (and padding tokens write nothing), for grouped and ungrouped query heads, with k and v in programs of
    # their own (a small grid) and in one program (split_per_sm 0: a grid past one wave)
    from kernels.rotary import kernel
    from kernels.rotary.kernel import rotary_store_kv_triton
    from kernels.rotary.reference import rotary_store_kv_ref
    from tests.kernels.attention.test_quantized_attention import quantized

    monkeypatch.setattr(kernel, "ROTARY_STORE_SPLIT_PER_SM", split_per_sm)

    gen = torch.Generator().manual_seed(num_heads * 7 + num_kv_heads)
    tokens, num_blocks, block_size, head_dim = 5, 4, 4, 32
    heads = torch.randn(tokens, num_heads + 2 * num_kv_heads, head_dim, generator=gen)
    q, k, v = heads.split_with_sizes([num_heads, num_kv_heads, num_kv_heads], dim=1)
    cos, sin = (torch.randn(tokens, head_dim // 2, generator=gen) for _ in "cs")
    slots = torch.tensor([3, 14, -1, 0, 9])
    blank = torch.zeros(num_blocks, block_size, num_kv_heads, head_dim)
    got, expected = ([quantized(blank, dtype), quantized(blank, dtype)] for _ in "ge")
    keep = slots >= 0
    q_ref = rotary_store_kv_ref(q[keep], k[keep], v[keep], cos[keep], sin[keep], *expected, slots[keep])
    q_got = rotary_store_kv_triton(q, k, v, cos, sin, *got, slots)
    torch.testing.assert_close(q_got[keep], q_ref, atol=1e-6, rtol=1e-6)
    for mine, theirs in zip(got, expected, strict=True):
        assert torch.equal(mine.codes, theirs.codes)
        torch.testing.assert_close(mine.scale, theirs.scale, atol=0, rtol=1e-3)  # one float16 ulp
