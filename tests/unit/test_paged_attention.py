"""Paged attention (torch reference) equals dense causal SDPA: prefill, chunked prefill, decode, mixes."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from kernels.attention.metadata import AttentionMetadata, SeqSpan
from kernels.attention.reference import paged_attention_ref
from kernels.store_kv.reference import store_kv_ref

pytestmark = pytest.mark.timeout(60)

HEAD_DIM = 16


def dense_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Full-sequence reference: q, k, v [S, H, D] (k/v GQA-expanded by the caller) → [S, H, D]."""
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         is_causal=True, scale=scale)
    return out.transpose(0, 1)


def run_case(seqs: list[tuple[int, int]], num_heads: int, num_kv_heads: int, block_size: int,
             shuffle_blocks: bool, seed: int = 0) -> None:
    """seqs: (cached, new) tokens per sequence. Stores the cached KV, then runs one step over the new ones."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    total_blocks = sum(-(-(c + n) // block_size) for c, n in seqs) + 3
    block_pool = list(range(total_blocks))
    if shuffle_blocks:
        rng.shuffle(block_pool)  # non-consecutive block tables exercise the gather path
    k_cache = torch.zeros(total_blocks, block_size, num_kv_heads, HEAD_DIM)
    v_cache = torch.zeros_like(k_cache)
    scale = HEAD_DIM ** -0.5

    full = []  # per sequence: q, k, v over all positions
    spans, slots, step_q, step_k, step_v = [], [], [], [], []
    row = 0
    for cached, new in seqs:
        length = cached + new
        q = torch.randn(length, num_heads, HEAD_DIM, generator=gen)
        k = torch.randn(length, num_kv_heads, HEAD_DIM, generator=gen)
        v = torch.randn(length, num_kv_heads, HEAD_DIM, generator=gen)
        full.append((q, k, v))
        blocks = tuple(block_pool.pop() for _ in range(-(-length // block_size)))
        seq_slots = [blocks[p // block_size] * block_size + p % block_size for p in range(length)]
        # Earlier steps already stored the cached prefix.
        cached_slots = torch.tensor(seq_slots[:cached], dtype=torch.long)
        store_kv_ref(k[:cached], v[:cached], k_cache, v_cache, cached_slots)
        first = blocks[0]
        contiguous = blocks == tuple(range(first, first + len(blocks)))
        spans.append(SeqSpan(row, new, length, blocks, first * block_size if contiguous else None))
        slots.extend(seq_slots[cached:])
        step_q.append(q[cached:])
        step_k.append(k[cached:])
        step_v.append(v[cached:])
        row += new
    meta = AttentionMetadata.from_spans(spans, slots, block_size)
    store_kv_ref(torch.cat(step_k), torch.cat(step_v), k_cache, v_cache, meta.slot_mapping)
    out = paged_attention_ref(torch.cat(step_q), k_cache, v_cache, meta, scale)

    group = num_heads // num_kv_heads
    for (cached, new), span, (q, k, v) in zip(seqs, spans, full, strict=True):
        k_all, v_all = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        expected = dense_causal(q, k_all, v_all, scale)[cached:]
        got = out[span.query_start:span.query_start + new]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shuffle_blocks", [False, True])
@pytest.mark.parametrize("length", [1, 15, 16, 17, 32, 33])
def test_full_prefill_matches_dense_causal_at_block_boundaries(length: int, shuffle_blocks: bool) -> None:
    run_case([(0, length)], num_heads=4, num_kv_heads=2, block_size=16, shuffle_blocks=shuffle_blocks)


@pytest.mark.parametrize("cached,new", [(16, 16), (15, 2), (17, 5), (31, 1), (7, 30)])
def test_chunked_prefill_sees_cached_context_and_causal_chunk(cached: int, new: int) -> None:
    run_case([(cached, new)], num_heads=6, num_kv_heads=2, block_size=8, shuffle_blocks=True)


@pytest.mark.parametrize("cached", [1, 15, 16, 47, 48])
def test_decode_attends_to_every_cached_token(cached: int) -> None:
    run_case([(cached, 1)], num_heads=9, num_kv_heads=3, block_size=16, shuffle_blocks=False)


def test_mixed_batch_of_decodes_and_prefill_chunks_with_gqa() -> None:
    seqs = [(20, 1), (0, 13), (5, 1), (16, 16), (33, 7), (0, 1)]
    run_case(seqs, num_heads=8, num_kv_heads=2, block_size=4, shuffle_blocks=True, seed=3)
    run_case(seqs, num_heads=8, num_kv_heads=8, block_size=4, shuffle_blocks=False, seed=4)


def test_random_shapes_match_dense_reference() -> None:
    rng = random.Random(7)
    for case in range(6):
        kv_heads = rng.choice([1, 2, 3])
        seqs = [(rng.randint(0, 40), rng.randint(1, 12)) for _ in range(rng.randint(1, 4))]
        run_case(seqs, num_heads=kv_heads * rng.choice([1, 2, 3]), num_kv_heads=kv_heads,
                 block_size=rng.choice([1, 4, 16]), shuffle_blocks=rng.random() < 0.5, seed=case)


def test_store_kv_writes_only_the_mapped_slots() -> None:
    k_cache = torch.zeros(4, 2, 1, HEAD_DIM)
    v_cache = torch.zeros_like(k_cache)
    k = torch.ones(3, 1, HEAD_DIM)
    v = 2 * torch.ones(3, 1, HEAD_DIM)
    store_kv_ref(k, v, k_cache, v_cache, torch.tensor([7, 0, 3]))
    written = torch.zeros(8, dtype=torch.bool)
    written[[7, 0, 3]] = True
    flat_k, flat_v = k_cache.view(8, -1), v_cache.view(8, -1)
    assert torch.all(flat_k[written] == 1) and torch.all(flat_v[written] == 2)
    assert torch.all(flat_k[~written] == 0) and torch.all(flat_v[~written] == 0)
