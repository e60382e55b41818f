"""The scheduler's prefix cache: reuse a new sequence's cached leading blocks, name blocks once computed."""
from __future__ import annotations

from contracts.prefix_hash import extend_block_hashes
from engine.block_manager import BlockManager
from engine.sequence import Sequence


class PrefixCache:
    """Hit accounting and the per-sequence side of the BlockManager's hash index.

    A sequence reuses at most its full blocks before its last token: that token is always computed (its
    logits give the next one), and the block holding it is private, so a shared block is never written.
    """

    def __init__(self, blocks: BlockManager) -> None:
        self.blocks = blocks
        self.block_size = blocks.block_size
        self.hit_tokens = 0  # prompt tokens found cached, over every admission
        self.query_tokens = 0  # prompt tokens looked up

    def match(self, seq: Sequence) -> list[int]:
        """The cached blocks seq could start from (no references taken)."""
        reusable = (seq.num_tokens - 1) // self.block_size
        extend_block_hashes(seq.block_hashes, seq.token_ids, self.block_size, reusable)
        return self.blocks.lookup(seq.block_hashes[:reusable])

    def free_blocks_needed(self, seq: Sequence, cached: list[int], num_tokens: int) -> int:
        """Free blocks admitting seq takes for `num_tokens` tokens when it starts from `cached`: the new
        blocks, plus cached ones that are free now (acquiring takes them off the free list)."""
        new = max(0, self.blocks.blocks_needed(num_tokens) - len(cached))
        return new + self.blocks.num_free_among(cached)

    def attach(self, seq: Sequence, cached: list[int]) -> None:
        """seq (holding no blocks, nothing computed) starts after its cached prefix; counts the lookup."""
        self.blocks.acquire(cached)
        seq.block_table = list(cached)
        seq.num_cached_blocks = len(cached)
        seq.num_computed_tokens = len(cached) * self.block_size
        self.hit_tokens += seq.num_computed_tokens
        self.query_tokens += seq.num_tokens

    def register(self, seq: Sequence) -> None:
        """Name seq's blocks that are now full of computed KV, so later sequences can share them."""
        full = min(seq.num_computed_tokens, seq.num_tokens) // self.block_size
        if full <= seq.num_cached_blocks:
            return
        extend_block_hashes(seq.block_hashes, seq.token_ids, self.block_size, full)
        for i in range(seq.num_cached_blocks, full):
            self.blocks.cache_block(seq.block_table[i], seq.block_hashes[i])
        seq.num_cached_blocks = full

    @property
    def hit_ratio(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0
