"""Reference-counted allocator of paged-KV-cache block ids (no tensors here: the cache owns the memory)."""
from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable


class NoFreeBlocks(RuntimeError):
    """An allocation asked for more blocks than are free; nothing was allocated."""


class BlockAccountingError(RuntimeError):
    """Block ids were freed/shared in a way that would corrupt the accounting (double free, unknown id)."""


class BlockManager:
    """Hands out block ids; a block returns to the free list when its last reference is freed.

    Refcounts let several sequences share one block (prefix sharing); every `allocate` or `incref` must be
    matched by exactly one `free` per id.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self._refcounts = [0] * num_blocks
        # FIFO reuse: a just-freed block is handed out last, which keeps stale-block bugs visible in tests.
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_total(self) -> int:
        return len(self._refcounts)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` tokens: ceil(num_tokens / block_size)."""
        return -(-max(0, num_tokens) // self.block_size)

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take `n` free blocks (refcount 1 each); all or nothing."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        if n > len(self._free):
            raise NoFreeBlocks(f"asked for {n} KV blocks, {len(self._free)} of {self.num_total} free")
        ids = [self._free.popleft() for _ in range(n)]
        for block_id in ids:
            self._refcounts[block_id] = 1
        return ids

    def incref(self, block_ids: Iterable[int]) -> None:
        """Add one reference to each (already referenced) block, e.g. a second sequence sharing a prefix."""
        ids = list(block_ids)
        for block_id in ids:
            self._check_id(block_id)
            if self._refcounts[block_id] == 0:
                raise BlockAccountingError(f"incref of free block {block_id}")
        for block_id in ids:
            self._refcounts[block_id] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference per listed id; validated first so a bad call changes nothing."""
        counts = Counter(block_ids)
        for block_id, n in counts.items():
            self._check_id(block_id)
            if self._refcounts[block_id] < n:
                raise BlockAccountingError(
                    f"free of block {block_id} x{n} but it has {self._refcounts[block_id]} reference(s)"
                    " (double free?)")
        for block_id, n in counts.items():
            self._refcounts[block_id] -= n
            if self._refcounts[block_id] == 0:
                self._free.append(block_id)

    def refcount(self, block_id: int) -> int:
        self._check_id(block_id)
        return self._refcounts[block_id]

    def check_invariants(self) -> None:
        """Raise BlockAccountingError unless free + referenced == total, no duplicates, no negative counts."""
        free_set = set(self._free)
        if len(free_set) != len(self._free):
            raise BlockAccountingError("free list holds duplicate block ids")
        if any(c < 0 for c in self._refcounts):
            raise BlockAccountingError("negative refcount")
        referenced = {i for i, c in enumerate(self._refcounts) if c > 0}
        if free_set & referenced:
            both = sorted(free_set & referenced)[:8]
            raise BlockAccountingError(f"blocks both free and referenced: {both}")
        if len(free_set) + len(referenced) != self.num_total:
            raise BlockAccountingError(
                f"{len(free_set)} free + {len(referenced)} referenced != {self.num_total} total (leak)")

    def _check_id(self, block_id: int) -> None:
        if not 0 <= block_id < len(self._refcounts):
            raise BlockAccountingError(f"block id {block_id} out of range [0, {len(self._refcounts)})")
