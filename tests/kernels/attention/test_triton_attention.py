"""Triton paged attention (split-K decode, varlen prefill) equals paged_attention_ref, interpreted on CPU."""
from __future__ import annotations

import functools
import random

import pytest
import torch
import triton
import triton.language as tl

from kernels.attention.kernel import (
    choose_num_splits,
    paged_attention_triton,
    paged_decode_attention,
    paged_prefill_attention,
)
from kernels.attention.metadata import AttentionMetadata, SeqSpan
from kernels.attention.reference import paged_attention_ref

pytestmark = pytest.mark.timeout(120)


@triton.jit
def _loop_to_loaded_bound(x_ptr):
    for i in range(tl.load(x_ptr)):
        tl.store(x_ptr + 1, i)


@functools.cache
def interpreter_runs_data_dependent_loops() -> bool:
    """Triton 3.6's interpreter under numpy 2.5 cannot use a loaded scalar as a loop bound (3.9's can)."""
    x = torch.tensor([3, 0], dtype=torch.int32)
    try:
        _loop_to_loaded_bound[(1,)](x)
    except Exception:  # noqa: BLE001 - any failure means "this interpreter can't", all we ask here
        return False
    return int(x[1]) == 2


@pytest.fixture(autouse=True)
def needs_data_dependent_loops() -> None:
    if not interpreter_runs_data_dependent_loops():
        pytest.skip("this triton interpreter cannot run loops bounded by loaded values (seen: triton 3.6 "
                    "with numpy 2.5); the compiled kernels are covered by tests/gpu")


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]


def make_batch(seqs: list[tuple[int, int]], num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
               shuffle_blocks: bool, seed: int) -> Batch:
    """seqs: (cached tokens, new tokens) each. Fills the cache with random KV for every position (earlier
    steps and this step's store); returns this step's q, the caches and the metadata. Spare blocks hold junk
    the kernel must skip."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    needed = [-(-(c + n) // block_size) for c, n in seqs]
    total_blocks = sum(needed) + 3
    pool = list(range(total_blocks))
    if shuffle_blocks:
        rng.shuffle(pool)  # non-consecutive, unordered block ids
    # Junk everywhere first: unread slots must not leak into the result.
    k_cache = 100 * torch.randn(total_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    v_cache = 100 * torch.randn(total_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    spans, slots, qs = [], [], []
    row = 0
    for (cached, new), count in zip(seqs, needed, strict=True):
        length = cached + new
        blocks = tuple(pool.pop() for _ in range(count))
        positions = torch.arange(length)
        flat = torch.tensor(blocks)[positions // block_size] * block_size + positions % block_size
        for cache in (k_cache, v_cache):
            cache.view(-1, num_kv_heads, head_dim)[flat] = torch.randn(length, num_kv_heads, head_dim,
                                                                       generator=gen)
        first = blocks[0]
        contiguous = blocks == tuple(range(first, first + count))
        spans.append(SeqSpan(row, new, length, blocks, first * block_size if contiguous else None))
        slots.extend(flat[cached:].tolist())
        qs.append(torch.randn(new, num_heads, head_dim, generator=gen))
        row += new
    meta = AttentionMetadata.from_spans(spans, slots, block_size)
    return torch.cat(qs), k_cache, v_cache, meta


def check(seqs: list[tuple[int, int]], num_heads: int, num_kv_heads: int, head_dim: int = 16,
          block_size: int = 4, shuffle_blocks: bool = True, seed: int = 0,
          num_splits: int | None = None) -> None:
    q, k_cache, v_cache, meta = make_batch(seqs, num_heads, num_kv_heads, head_dim, block_size,
                                           shuffle_blocks, seed)
    scale = head_dim ** -0.5
    expected = paged_attention_ref(q, k_cache, v_cache, meta, scale)
    if num_splits is not None:
        got = paged_decode_attention(q, k_cache, v_cache, meta, scale, num_splits=num_splits)
    else:
        got = paged_attention_triton(q, k_cache, v_cache, meta, scale)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_matches_reference_for_gqa_ratios_with_and_without_split_k(group: int, num_splits: int):
    # Contexts straddle block (4) and tile (16) boundaries; one sequence is shorter than the split count.
    seqs = [(3, 1), (15, 1), (16, 1), (0, 1), (36, 1)]
    check(seqs, num_heads=2 * group, num_kv_heads=2, num_splits=num_splits, seed=group)


@pytest.mark.parametrize("length", [4, 8, 16, 17, 32, 33])
def test_decode_at_block_and_tile_boundaries(length: int) -> None:
    check([(length - 1, 1)], num_heads=3, num_kv_heads=1, block_size=8, shuffle_blocks=False, seed=length)


def test_decode_split_k_with_more_splits_than_tiles_matches_reference() -> None:
    # Several splits are empty: the reduce must weight them to zero.
    check([(5, 1), (40, 1)], num_heads=4, num_kv_heads=1, num_splits=8, seed=11)


@pytest.mark.parametrize("num_splits", [2, 3, 8, 32])
def test_in_place_merge_equals_the_merge_kernel_and_leaves_its_counters_at_zero(num_splits: int,
                                                                                monkeypatch) -> None:
    import dataclasses

    import kernels.attention.kernel as attention

    # Padding rows (0 tokens) and splits past a short context arrive too; the last arrival merges. At 32
    # splits the 230-token row has 15 live splits of one 16-key tile: the merge reads them 8 at a time.
    q, k_cache, v_cache, meta = make_batch([(40, 1), (5, 1), (0, 1), (230, 1)], num_heads=6, num_kv_heads=2,
                                           head_dim=16, block_size=4, shuffle_blocks=True, seed=num_splits)
    counters = torch.zeros(16, dtype=torch.int32)
    meta = dataclasses.replace(meta, arrivals=counters)
    scale = 16 ** -0.5
    in_place = [paged_decode_attention(q, k_cache, v_cache, meta, scale, num_splits=num_splits)
                for _ in range(2)]  # the second launch reuses the counters the first one reset
    assert torch.count_nonzero(counters) == 0
    monkeypatch.setattr(attention, "merge_in_place", lambda splits: False)
    separate = paged_decode_attention(q, k_cache, v_cache, meta, scale, num_splits=num_splits)
    expected = paged_attention_ref(q, k_cache, v_cache, meta, scale)
    torch.testing.assert_close(in_place[0], expected, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(in_place[1], in_place[0], atol=0, rtol=0)
    torch.testing.assert_close(separate, in_place[0], atol=1e-6, rtol=1e-6)


def test_auto_routing_sends_decode_only_batches_to_split_k_decode() -> None:
    check([(30, 1), (2, 1), (63, 1)], num_heads=8, num_kv_heads=2, block_size=16, seed=5)


@pytest.mark.parametrize("group", [1, 3, 4])
def test_prefill_only_batch_is_causal_and_matches_reference(group: int) -> None:
    check([(0, 17), (0, 4), (0, 1), (0, 32)], num_heads=group, num_kv_heads=1, block_size=4, seed=20 + group)


@pytest.mark.parametrize("cached,new", [(4, 4), (15, 2), (16, 16), (7, 30), (33, 1)])
def test_chunked_prefill_reads_earlier_chunks_from_the_paged_cache(cached: int, new: int) -> None:
    check([(cached, new)], num_heads=6, num_kv_heads=2, block_size=8, seed=cached * 100 + new)


def test_mixed_batch_of_decodes_and_prefill_chunks_matches_reference() -> None:
    seqs = [(20, 1), (0, 13), (5, 1), (16, 16), (33, 7), (0, 1)]
    check(seqs, num_heads=8, num_kv_heads=2, block_size=4, seed=3)
    check(seqs, num_heads=4, num_kv_heads=4, block_size=4, shuffle_blocks=False, seed=4)


def test_random_ragged_batches_match_reference() -> None:
    rng = random.Random(7)
    for case in range(4):
        kv_heads = rng.choice([1, 2])
        seqs = [(rng.randint(0, 40), rng.choice([1, rng.randint(1, 20)])) for _ in range(rng.randint(1, 4))]
        check(seqs, num_heads=kv_heads * rng.choice([1, 3, 4]), num_kv_heads=kv_heads,
              head_dim=rng.choice([16, 32]), block_size=rng.choice([1, 4, 16]),
              shuffle_blocks=rng.random() < 0.7, seed=case)


def test_prefill_kernel_also_serves_decode_rows() -> None:
    # The router of paged_attention_triton may send decode rows here when they share a batch with a chunk.
    q, k_cache, v_cache, meta = make_batch([(9, 1), (4, 1)], 4, 2, 16, 4, True, seed=9)
    expected = paged_attention_ref(q, k_cache, v_cache, meta, 0.25)
    torch.testing.assert_close(paged_prefill_attention(q, k_cache, v_cache, meta, 0.25), expected,
                               atol=2e-5, rtol=2e-5)


def test_decode_reads_strided_q_views() -> None:
    # q arrives as a view of the fused qkv projection: row stride larger than Hq * D.
    q, k_cache, v_cache, meta = make_batch([(6, 1), (12, 1)], 4, 2, 16, 4, True, seed=2)
    fused = torch.cat([q.flatten(1), torch.randn(q.shape[0], 32)], dim=1)
    q_view = fused[:, :64].view(-1, 4, 16)
    expected = paged_attention_ref(q, k_cache, v_cache, meta, 0.25)
    torch.testing.assert_close(paged_attention_triton(q_view, k_cache, v_cache, meta, 0.25), expected,
                               atol=2e-5, rtol=2e-5)


def test_choose_num_splits_uses_split_k_only_for_few_long_sequences() -> None:
    cpu = torch.device("cpu")
    assert choose_num_splits(1, 1, 4096, cpu) > 1
    assert choose_num_splits(1, 1, 100, cpu) == 1  # too short to split
    assert choose_num_splits(64, 8, 4096, cpu) == 1  # enough programs already


def test_mismatched_heads_raise_value_error() -> None:
    q, k_cache, v_cache, meta = make_batch([(3, 1)], 4, 2, 16, 4, False, seed=1)
    with pytest.raises(ValueError):
        paged_attention_triton(q[:, :3], k_cache, v_cache, meta, 0.25)


def test_mixed_batch_with_split_k_decode_rows_matches_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    from kernels.attention import kernel as triton_attention

    # Force split-K for the 1-row sequences beside prefill chunks (auto picks 1 at these tiny lengths).
    monkeypatch.setattr(triton_attention, "choose_num_splits", lambda *args: 3)
    check([(40, 1), (0, 9), (17, 1), (12, 5)], num_heads=6, num_kv_heads=2, block_size=4, seed=13)


def test_decode_launch_config_fills_waves_and_preloads_only_one_wave(monkeypatch) -> None:
    import kernels.attention.config as config

    monkeypatch.setattr(config, "num_sms", lambda device: 132)
    cuda = torch.device("cuda", 0)  # only its type is read once num_sms is fixed
    # 384 programs: one wave of three a SM (two stages); 512: two full waves of two a SM (three stages).
    assert config.decode_config(128, False, 384, cuda) == (64, 4, 2)
    assert config.decode_config(128, False, 512, cuda) == (64, 4, 3)
    assert config.preload_first_tile(384, 2, cuda) and config.preload_first_tile(264, 3, cuda)
    assert not config.preload_first_tile(512, 3, cuda) and not config.preload_first_tile(397, 2, cuda)
