"""Tree-mask attention (tree verification): the Triton prefill kernel equals the torch reference, interpreted
on CPU, and a tree's row equals causal attention over the chain of its ancestors."""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from kernels.attention.kernel import paged_attention_triton
from kernels.attention.metadata import AttentionMetadata, SeqSpan
from kernels.attention.reference import paged_attention_ref
from tests.kernels.attention.test_triton_attention import make_batch, needs_data_dependent_loops  # noqa: F401

pytestmark = pytest.mark.timeout(120)


def random_tree(size: int, rng: random.Random) -> list[int]:
    """Parent of each node in a topological order (node 0 the root: -1)."""
    return [-1] + [rng.randrange(i) for i in range(1, size)]


def ancestor_bits(parents: list[int]) -> tuple[int, ...]:
    bits: list[int] = []
    for i, parent in enumerate(parents):
        bits.append((bits[parent] if parent >= 0 else 0) | 1 << i)
    return tuple(bits)


def with_trees(meta: AttentionMetadata, trees: dict[int, tuple[int, ...]]) -> AttentionMetadata:
    """meta with spans[i] a tree chunk of masks trees[i]."""
    spans = [dataclasses.replace(s, tree=trees.get(i)) for i, s in enumerate(meta.spans)]
    return AttentionMetadata.from_spans(spans, meta.slot_mapping.tolist(), meta.block_size)


def check_tree(seqs: list[tuple[int, int]], trees: dict[int, list[int]], num_heads: int, num_kv_heads: int,
               block_size: int, seed: int) -> None:
    q, k_cache, v_cache, meta = make_batch(seqs, num_heads, num_kv_heads, 16, block_size, True, seed)
    meta = with_trees(meta, {i: ancestor_bits(p) for i, p in trees.items()})
    expected = paged_attention_ref(q, k_cache, v_cache, meta, 0.25)
    torch.testing.assert_close(paged_attention_triton(q, k_cache, v_cache, meta, 0.25), expected,
                               atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("group", [1, 3])
def test_tree_chunks_match_the_reference(group: int) -> None:
    rng = random.Random(group)
    # Contexts straddle blocks and tiles; a 40-node tree spans several 16-row tiles of the interpreter.
    seqs = [(21, 9), (0, 12), (35, 40)]
    check_tree(seqs, {i: random_tree(n, rng) for i, (_, n) in enumerate(seqs)}, 2 * group, 2, 4, group)


def test_a_tree_beside_causal_chunks_and_decode_rows_leaves_them_causal() -> None:
    rng = random.Random(5)
    seqs = [(20, 1), (7, 11), (16, 30), (3, 1), (64, 64)]  # the last: a full 64-node tree (bit 63 used)
    check_tree(seqs, {1: random_tree(11, rng), 4: random_tree(64, rng)}, 4, 2, 8, 7)


def test_a_chain_shaped_tree_is_causal_attention() -> None:
    q, k_cache, v_cache, meta = make_batch([(13, 6), (30, 17)], 6, 2, 16, 4, True, 3)
    chains = with_trees(meta, {0: ancestor_bits([-1, 0, 1, 2, 3, 4]), 1: ancestor_bits(list(range(-1, 16)))})
    causal = paged_attention_ref(q, k_cache, v_cache, meta, 0.25)
    torch.testing.assert_close(paged_attention_ref(q, k_cache, v_cache, chains, 0.25), causal,
                               atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(paged_attention_triton(q, k_cache, v_cache, chains, 0.25),
                               paged_attention_triton(q, k_cache, v_cache, meta, 0.25), atol=1e-6, rtol=1e-6)


def test_each_tree_row_equals_causal_attention_over_its_ancestor_chain() -> None:
    context, parents = 10, random_tree(9, random.Random(11))
    q, k_cache, v_cache, meta = make_batch([(context, 9)], 4, 2, 16, 4, False, 12)
    tree = with_trees(meta, {0: ancestor_bits(parents)})
    got = paged_attention_triton(q, k_cache, v_cache, tree, 0.25)
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    slots = meta.slot_mapping  # the tree's rows, in order; the context precedes them in block order
    context_slots = [meta.spans[0].block_ids[p // 4] * 4 + p % 4 for p in range(context)]
    for node in range(9):
        path = [node]
        while parents[path[-1]] >= 0:
            path.append(parents[path[-1]])
        path.reverse()
        # The chain context + path, laid out in a fresh cache of its own, with the node's query last.
        chain_slots = torch.tensor(context_slots + slots[path].tolist())
        length = len(chain_slots)
        blocks = -(-length // 4)
        chain_k = torch.zeros(blocks * 4, *k_cache.shape[2:])
        chain_v = torch.zeros_like(chain_k)
        chain_k[:length], chain_v[:length] = flat_k[chain_slots], flat_v[chain_slots]
        chain_meta = AttentionMetadata.from_spans([SeqSpan(0, 1, length, tuple(range(blocks)), 0)],
                                                  [length - 1], 4)
        expected = paged_attention_ref(q[node:node + 1], chain_k.view(blocks, 4, *k_cache.shape[2:]),
                                       chain_v.view(blocks, 4, *k_cache.shape[2:]), chain_meta, 0.25)
        torch.testing.assert_close(got[node:node + 1], expected, atol=2e-5, rtol=2e-5)


def test_tree_masks_must_cover_each_row() -> None:
    _, _, _, meta = make_batch([(4, 3)], 2, 2, 16, 4, False, 1)
    with pytest.raises(ValueError):
        with_trees(meta, {0: (1, 3)})
