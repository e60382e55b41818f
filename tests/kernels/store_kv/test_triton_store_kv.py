"""Triton store_kv writes exactly what store_kv_ref writes (interpreted on CPU), and skips padding slots."""
from __future__ import annotations

import random

import pytest
import torch

from kernels.store_kv.kernel import store_kv_triton
from kernels.store_kv.reference import store_kv_ref

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("num_kv_heads,head_dim,block_size", [(1, 16, 4), (3, 32, 16), (2, 24, 1)])
def test_scatter_to_random_slots_matches_reference(num_kv_heads: int, head_dim: int, block_size: int) -> None:
    gen = torch.Generator().manual_seed(num_kv_heads * head_dim)
    num_blocks = 6
    slots = random.Random(head_dim).sample(range(num_blocks * block_size), k=min(9, num_blocks * block_size))
    k = torch.randn(len(slots), num_kv_heads, head_dim, generator=gen)
    v = torch.randn(len(slots), num_kv_heads, head_dim, generator=gen)
    caches = [torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen) for _ in range(2)]
    expected = [c.clone() for c in caches]
    slot_mapping = torch.tensor(slots, dtype=torch.int64)
    store_kv_ref(k, v, *expected, slot_mapping)
    store_kv_triton(k, v, *caches, slot_mapping)
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])


def test_strided_kv_views_and_cache_dtype_cast_match_reference() -> None:
    # k, v arrive as views of the fused qkv output; a half-precision cache takes a cast on store.
    fused = torch.randn(5, 3 * 2 * 16)
    k = fused[:, 32:64].view(5, 2, 16)
    v = fused[:, 64:].view(5, 2, 16)
    slot_mapping = torch.tensor([0, 9, 4, 15, 2])
    caches = [torch.zeros(4, 4, 2, 16, dtype=torch.float16) for _ in range(2)]
    expected = [c.clone() for c in caches]
    store_kv_ref(k, v, *expected, slot_mapping)
    store_kv_triton(k, v, *caches, slot_mapping)
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])


def test_negative_slots_are_padding_and_leave_the_cache_untouched() -> None:
    k = torch.ones(3, 1, 16)
    v = 2 * torch.ones(3, 1, 16)
    k_cache, v_cache = torch.zeros(2, 4, 1, 16), torch.zeros(2, 4, 1, 16)
    store_kv_triton(k, v, k_cache, v_cache, torch.tensor([5, -1, 2]))
    written = torch.zeros(8, dtype=torch.bool)
    written[[5, 2]] = True
    assert torch.all(k_cache.view(8, -1)[written] == 1) and torch.all(v_cache.view(8, -1)[written] == 2)
    assert torch.all(k_cache.view(8, -1)[~written] == 0) and torch.all(v_cache.view(8, -1)[~written] == 0)


def test_shape_mismatch_raises_value_error() -> None:
    with pytest.raises(ValueError):
        store_kv_triton(torch.ones(2, 2, 16), torch.ones(2, 2, 16), torch.zeros(2, 4, 1, 16),
                        torch.zeros(2, 4, 1, 16), torch.tensor([0, 1]))
