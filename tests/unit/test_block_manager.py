"""BlockManager: allocation accounting, refcounted sharing, and the errors that guard against corruption."""
from __future__ import annotations

import random

import pytest

from engine.block_manager import BlockAccountingError, BlockManager, NoFreeBlocks


def test_blocks_needed_is_ceiling_division():
    bm = BlockManager(num_blocks=4, block_size=16)
    assert [bm.blocks_needed(n) for n in (0, 1, 15, 16, 17, 32, 33)] == [0, 1, 1, 1, 2, 2, 3]


def test_allocate_hands_out_distinct_ids_and_counts_them():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = bm.allocate(3)
    b = bm.allocate(5)
    assert len(set(a) | set(b)) == 8
    assert bm.num_free == 0 and bm.num_total == 8
    assert not bm.can_allocate(1) and bm.can_allocate(0)
    bm.check_invariants()


def test_allocate_is_all_or_nothing():
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.allocate(3)
    with pytest.raises(NoFreeBlocks):
        bm.allocate(2)
    assert bm.num_free == 1
    bm.check_invariants()


def test_double_free_raises_and_changes_nothing():
    bm = BlockManager(num_blocks=4, block_size=4)
    ids = bm.allocate(2)
    bm.free(ids)
    with pytest.raises(BlockAccountingError):
        bm.free(ids)
    assert bm.num_free == 4
    bm.check_invariants()


def test_free_validates_whole_call_before_touching_any_block():
    bm = BlockManager(num_blocks=4, block_size=4)
    a, b = bm.allocate(2)
    with pytest.raises(BlockAccountingError):
        bm.free([a, b, b])  # b has one reference, not two
    assert bm.refcount(a) == 1 and bm.refcount(b) == 1 and bm.num_free == 2


def test_unknown_block_id_raises():
    bm = BlockManager(num_blocks=4, block_size=4)
    with pytest.raises(BlockAccountingError):
        bm.free([4])
    with pytest.raises(BlockAccountingError):
        bm.incref([-1])


def test_shared_block_returns_to_free_list_only_after_last_reference():
    bm = BlockManager(num_blocks=2, block_size=4)
    (block,) = bm.allocate(1)
    bm.incref([block])
    bm.free([block])
    assert bm.num_free == 1 and bm.refcount(block) == 1
    bm.free([block])
    assert bm.num_free == 2 and bm.refcount(block) == 0
    bm.check_invariants()


def test_incref_of_free_block_raises():
    bm = BlockManager(num_blocks=2, block_size=4)
    with pytest.raises(BlockAccountingError):
        bm.incref([0])


def test_check_invariants_detects_a_leak():
    bm = BlockManager(num_blocks=3, block_size=4)
    bm.allocate(1)
    bm._refcounts[0] = 0  # simulate corruption: a block neither free nor referenced
    with pytest.raises(BlockAccountingError):
        bm.check_invariants()


def test_invariants_hold_under_random_alloc_incref_free():
    rng = random.Random(1234)
    bm = BlockManager(num_blocks=64, block_size=8)
    owners: list[list[int]] = []  # each owner holds one reference to each of its ids
    for _ in range(2000):
        op = rng.random()
        if op < 0.45:
            n = rng.randint(0, 10)
            if bm.can_allocate(n):
                owners.append(bm.allocate(n))
            else:
                with pytest.raises(NoFreeBlocks):
                    bm.allocate(n)
        elif op < 0.6 and owners:
            shared = rng.choice(owners)
            bm.incref(shared)
            owners.append(list(shared))
        elif owners:
            bm.free(owners.pop(rng.randrange(len(owners))))
        bm.check_invariants()
        held = {i for ids in owners for i in ids}
        assert bm.num_free == 64 - len(held)
        for i in held:
            assert bm.refcount(i) == sum(ids.count(i) for ids in owners)
    for ids in owners:
        bm.free(ids)
    assert bm.num_free == 64
    bm.check_invariants()
