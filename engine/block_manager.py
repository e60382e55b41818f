"""Reference-counted allocator of paged-KV-cache block ids, with the prefix cache's hash -> block index."""
from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable


class NoFreeBlocks(RuntimeError):
    """An allocation asked for more blocks than are free; nothing was allocated."""


class BlockAccountingError(RuntimeError):
    """Block ids were freed/shared in a way that would corrupt the accounting (double free, unknown id)."""


class BlockManager:
    """Hands out block ids; a block returns to the free list when its last reference is freed.

    Refcounts let several sequences share one block (prefix sharing); every `allocate`, `incref` or
    `acquire` must be matched by exactly one `free` per id.

    Prefix cache: a full, computed block can be named by its chain hash (`cache_block`). When its last
    reference goes it stays in the free list with its contents and its name, reusable (`lookup`, `acquire`)
    until `allocate` hands it out for new contents: the free list is LRU order, so the least recently freed
    cached block is evicted first. Free blocks that hold a hash still count as free.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self._refcounts = [0] * num_blocks
        # FIFO reuse: a just-freed block is handed out last, which keeps stale-block bugs visible in tests and
        # makes the free list the prefix cache's LRU order. An OrderedDict: `acquire` takes from its middle.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._hash_of: dict[int, int] = {}  # block id -> the chain hash of its contents
        self._block_of: dict[int, int] = {}  # chain hash -> the block holding it
        self.num_evicted = 0  # cached blocks handed out for new contents

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
        ids = [self._free.popitem(last=False)[0] for _ in range(n)]
        for block_id in ids:
            self._refcounts[block_id] = 1
            h = self._hash_of.pop(block_id, None)
            if h is not None:  # evicted: its old contents are about to be overwritten
                del self._block_of[h]
                self.num_evicted += 1
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
                self._free[block_id] = None  # most recently used end: evicted last

    # ---- prefix cache ----

    def cache_block(self, block_id: int, block_hash: int) -> None:
        """Name a referenced, full, computed block by its chain hash; a hash already cached elsewhere (two
        sequences computed the same prefix at once) keeps its first block, this one stays private."""
        self._check_id(block_id)
        if self._refcounts[block_id] == 0:
            raise BlockAccountingError(f"cache_block of free block {block_id}")
        if block_hash in self._block_of or block_id in self._hash_of:
            return
        self._hash_of[block_id] = block_hash
        self._block_of[block_hash] = block_id

    def lookup(self, block_hashes: Iterable[int]) -> list[int]:
        """The cached blocks of the longest prefix of `block_hashes` (no references taken)."""
        found: list[int] = []
        for h in block_hashes:
            block_id = self._block_of.get(h)
            if block_id is None:
                break
            found.append(block_id)
        return found

    def num_free_among(self, block_ids: Iterable[int]) -> int:
        """How many of these (cached) blocks are unreferenced: acquiring them takes them off the free list."""
        return sum(1 for b in block_ids if self._refcounts[b] == 0)

    def acquire(self, block_ids: Iterable[int]) -> None:
        """Take one reference on each cached block, free or not (a prefix-cache hit)."""
        ids = list(block_ids)
        for block_id in ids:
            self._check_id(block_id)
            if block_id not in self._hash_of:
                raise BlockAccountingError(f"acquire of uncached block {block_id}")
        for block_id in ids:
            if self._refcounts[block_id] == 0:
                del self._free[block_id]
            self._refcounts[block_id] += 1

    def is_cached(self, block_id: int) -> bool:
        return block_id in self._hash_of

    def cached_hashes(self) -> list[int]:
        """Every cached chain hash, referenced or free (what a worker tells the router it holds)."""
        return list(self._block_of)

    @property
    def num_cached(self) -> int:
        return len(self._block_of)

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
        if any(self._hash_of.get(b) != h for h, b in self._block_of.items()) or \
                len(self._hash_of) != len(self._block_of):
            raise BlockAccountingError("prefix-cache index out of step (hash -> block -> hash)")
        if len(free_set) + len(referenced) != self.num_total:
            raise BlockAccountingError(
                f"{len(free_set)} free + {len(referenced)} referenced != {self.num_total} total (leak)")

    def _check_id(self, block_id: int) -> None:
        if not 0 <= block_id < len(self._refcounts):
            raise BlockAccountingError(f"block id {block_id} out of range [0, {len(self._refcounts)})")
