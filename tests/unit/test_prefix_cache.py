"""Prefix cache without a model: chain hashes, hits and misses, LRU eviction, refcounts, exact free counts."""
from __future__ import annotations

import pytest

from contracts.prefix_hash import block_hashes, extend_block_hashes
from contracts.sampling import SamplingParams
from contracts.transfer import TransferTarget
from engine.block_manager import BlockAccountingError, BlockManager
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import Sequence, SequenceStatus

pytestmark = pytest.mark.timeout(60)

BS = 4


def make(num_blocks: int = 16, **cfg) -> tuple[Scheduler, BlockManager]:
    cfg = {"max_batch_tokens": 64, "max_num_seqs": 8, "max_model_len": 256, "prefix_caching": True} | cfg
    bm = BlockManager(num_blocks, BS)
    return Scheduler(SchedulerConfig(block_size=BS, **cfg), bm), bm


def seq(rid: str, tokens: list[int], max_tokens: int = 1) -> Sequence:
    return Sequence(rid, list(tokens), SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def run_to_end(sched: Scheduler, bm: BlockManager) -> None:
    """Steps with a fake model (token 7 everywhere) until nothing is left; checks the accounting each step."""
    while sched.has_work():
        out = sched.schedule()
        assert not out.is_empty
        sched.postprocess(out, {c.seq.request_id: (7,) * c.num_sampled for c in out.chunks if c.num_sampled})
        bm.check_invariants()


PROMPT = list(range(100, 114))  # 14 tokens: 3 full blocks and a partial one


def test_hashes_chain_so_equal_blocks_after_different_prefixes_differ():
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8], BS)
    b = block_hashes([9, 9, 9, 9, 5, 6, 7, 8], BS)
    assert len(a) == 2 and a[1] != b[1]  # same tokens in block 1, different parents
    assert block_hashes([1, 2, 3, 4, 5, 6, 7], BS) == a[:1]  # a partial block has no hash
    assert extend_block_hashes(a[:1], [1, 2, 3, 4, 5, 6, 7, 8], BS) == a  # incremental == at once


def test_second_identical_prompt_skips_its_cached_full_blocks():
    sched, bm = make()
    sched.add(seq("a", PROMPT))
    run_to_end(sched, bm)
    assert bm.num_cached == 3 and bm.num_free == 16  # cached blocks are free, still reusable
    b = seq("b", PROMPT)
    sched.add(b)
    out = sched.schedule()
    (chunk,) = out.chunks
    assert chunk.start == 12 and chunk.num_new_tokens == 2  # only the partial block is computed
    stats = sched.stats()
    assert (stats.prefix_hit_tokens, stats.prefix_query_tokens) == (12, 28)


def test_last_token_is_always_computed_even_when_every_block_is_cached():
    sched, bm = make()
    prompt = list(range(100, 112))  # exactly 3 blocks
    sched.add(seq("a", prompt))
    run_to_end(sched, bm)
    sched.add(seq("b", prompt))
    (chunk,) = sched.schedule().chunks
    assert (chunk.start, chunk.num_new_tokens, chunk.num_sampled) == (8, 4, 1)  # the last block is private


def test_a_different_prefix_misses():
    sched, bm = make()
    sched.add(seq("a", PROMPT))
    run_to_end(sched, bm)
    sched.add(seq("b", [1] + PROMPT[1:]))  # first block differs: every chained hash differs
    (chunk,) = sched.schedule().chunks
    assert chunk.start == 0
    assert sched.stats().prefix_hit_tokens == 0


def test_shared_blocks_are_refcounted_and_freed_exactly_once():
    sched, bm = make()
    a, b = seq("a", PROMPT, max_tokens=4), seq("b", PROMPT, max_tokens=4)
    sched.add(a)
    out = sched.schedule()
    sched.postprocess(out, {"a": (7,)})  # a's prompt computed: its 3 full blocks are cached
    sched.add(b)
    sched.schedule()
    assert b.block_table[:3] == a.block_table[:3] and b.block_table[3] != a.block_table[3]
    assert [bm.refcount(x) for x in a.block_table[:3]] == [2, 2, 2]
    free_before = bm.num_free
    sched.abort("a")
    assert [bm.refcount(x) for x in b.block_table[:3]] == [1, 1, 1]
    assert bm.num_free == free_before + 1  # only a's private partial block came back
    sched.abort("b")
    assert bm.num_free == 16
    bm.check_invariants()


def test_least_recently_freed_cached_blocks_are_evicted_first():
    sched, bm = make(num_blocks=8)
    sched.add(seq("old", list(range(100, 109))))  # 2 full blocks cached
    run_to_end(sched, bm)
    sched.add(seq("new", list(range(200, 209))))  # 2 more, freed later
    run_to_end(sched, bm)
    assert bm.num_cached == 4
    # 6 blocks for a fresh prompt: the 4 never-cached free blocks... and then the 2 oldest cached ones
    sched.add(seq("big", list(range(300, 324))))
    sched.schedule()
    assert bm.num_evicted == 2
    assert len(bm.lookup(block_hashes(list(range(100, 108)), BS))) == 0  # "old" is gone
    assert len(bm.lookup(block_hashes(list(range(200, 208)), BS))) == 2  # "new" survived


def test_a_hit_on_free_cached_blocks_counts_them_against_the_free_pool():
    sched, bm = make(num_blocks=5)
    sched.add(seq("a", PROMPT))  # 4 blocks
    run_to_end(sched, bm)
    sched.add(seq("hog", [1, 2, 3], max_tokens=100))  # holds one block from here on
    out = sched.schedule()
    sched.postprocess(out, {"hog": (7,)})
    b = seq("b", PROMPT)
    sched.add(b)
    sched.schedule()
    assert b.num_computed_tokens == 12 and len(b.block_table) == 4
    bm.check_invariants()
    sched.abort("b")
    sched.abort("hog")
    assert bm.num_free == 5


def test_decode_side_reserve_starts_after_the_cached_prefix_and_caches_at_activate():
    sched, bm = make()
    first = seq("a", PROMPT, max_tokens=3)
    assert sched.reserve(first) and first.num_computed_tokens == 0  # nothing cached yet: all of it travels
    sched.activate("a", 7)
    assert bm.num_cached == 3  # the received prompt blocks are named once the KV is in
    second = seq("b", PROMPT, max_tokens=3)
    assert sched.reserve(second)
    assert second.num_computed_tokens == 12 and second.status is SequenceStatus.AWAITING_KV
    assert second.block_table[:3] == first.block_table[:3]
    sched.abort("b")
    sched.abort("a")
    assert bm.num_free == 16
    bm.check_invariants()


def test_preempted_sequence_finds_its_blocks_again():
    sched, bm = make(num_blocks=6, max_batch_tokens=64)
    a = seq("a", list(range(100, 109)), max_tokens=20)  # 9 tokens: 3 blocks
    sched.add(a)
    out = sched.schedule()
    sched.postprocess(out, {"a": (7,)})
    sched._preempt(a, [])
    assert a.num_computed_tokens == 0 and bm.num_free == 6
    (chunk,) = sched.schedule().chunks
    assert chunk.start == 8  # two full blocks came back from the cache


def test_block_manager_rejects_misuse_of_the_cache():
    bm = BlockManager(4, BS)
    (x,) = bm.allocate(1)
    with pytest.raises(BlockAccountingError):
        bm.acquire([x])  # not cached
    bm.free([x])
    with pytest.raises(BlockAccountingError):
        bm.cache_block(x, 123)  # free blocks hold nothing to name


class _Sizing:
    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // BS)


def test_a_transfer_target_with_a_start_offset_carries_only_the_blocks_after_it():
    target = TransferTarget("r", "d", (5, 6, 7, 8), num_tokens=14, start_token=12)
    assert (target.first_block(_Sizing()), target.num_blocks(_Sizing())) == (3, 1)
    assert TransferTarget("r", "d", (5, 6, 7, 8), 14).num_blocks(_Sizing()) == 4
    for bad in (5, 16):  # not a block boundary; past the prompt's last block
        with pytest.raises(ValueError, match="start_token"):
            TransferTarget("r", "d", (5, 6, 7, 8), 14, start_token=bad).num_blocks(_Sizing())
