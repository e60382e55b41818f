"""What attention needs about a flat batch: where each token's KV goes, which cached tokens a query sees."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


class ChunkSequence(Protocol):
    """What `from_chunks` reads of a chunk's sequence (the engine's Sequence has it)."""

    @property
    def request_id(self) -> str: ...

    @property
    def block_table(self) -> Sequence[int]: ...


class Chunk(Protocol):
    """What `from_chunks` reads of a scheduled chunk (the engine's ScheduledChunk): kernels stay leaves."""

    @property
    def seq(self) -> ChunkSequence: ...

    @property
    def start(self) -> int: ...

    @property
    def num_new_tokens(self) -> int: ...


class BlockTableError(ValueError):
    """A sequence's block table does not cover its scheduled tokens (scheduler/runner contract broken)."""


@dataclass(frozen=True)
class SeqSpan:
    """Host-side view of one sequence in the batch (the torch reference reads this, not device tensors)."""

    query_start: int  # first row of this sequence in the flat batch
    query_len: int  # tokens computed this step
    seq_len: int  # tokens in the KV cache once this step stored its KV (earlier context + query)
    block_ids: tuple[int, ...]  # blocks holding positions [0, seq_len)
    # Set when those blocks are consecutive ids: the context is then one contiguous slice of the flat cache,
    # so attention can read a view instead of gathering blocks.
    first_slot: int | None
    # A tree verify chunk (engine/spec/tree.py): per query row, bit j set when the row attends to the chunk's
    # j-th row (its tree ancestors and itself); the context before the chunk stays visible to every row.
    # None: causal within the chunk. At most MAX_TREE_ROWS rows.
    tree: tuple[int, ...] | None = None


# Tree rows' visibility is one int64 bitmask per query row.
MAX_TREE_ROWS = 64


def _as_int64(bits: int) -> int:
    """A 64-bit mask as the signed int64 that holds the same bits."""
    return bits - (1 << 64) if bits >= 1 << 63 else bits


@dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: flat cache slot (block * block_size + offset) of each new token
    query_start_loc: torch.Tensor  # [B + 1] int32: cumulative query lengths
    seq_lens: torch.Tensor  # [B] int32: SeqSpan.seq_len per sequence
    block_tables: torch.Tensor  # [B, max_blocks] int32, rows padded with 0 past each sequence's blocks
    max_query_len: int
    max_seq_len: int
    block_size: int
    spans: tuple[SeqSpan, ...]
    # int32 zeros the decode kernel may count split arrivals in (kernels/attention/config.py), owned by
    # whoever replays this metadata from a CUDA graph; None: the kernels use a shared per-stream buffer.
    arrivals: torch.Tensor | None = None
    # [T] int64, set when some span is a tree: its rows' SeqSpan.tree bits; rows of other spans hold -1
    # (every bit: causal alone decides). None: every chunk is causal (the kernels compile without the mask).
    tree_mask: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.spans[-1].query_start + self.spans[-1].query_len if self.spans else 0

    @property
    def num_seqs(self) -> int:
        return len(self.spans)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1

    @classmethod
    def from_chunks(
        cls, chunks: Iterable[Chunk], block_size: int, device: torch.device | str = "cpu"
    ) -> AttentionMetadata:
        """Build from scheduled chunks; rows follow chunk order (the runner lays tokens out the same way)."""
        spans: list[SeqSpan] = []
        slots: list[int] = []
        row = 0
        for chunk in chunks:
            seq_len = chunk.start + chunk.num_new_tokens
            num_blocks = -(-seq_len // block_size)
            table = chunk.seq.block_table
            if len(table) < num_blocks:
                raise BlockTableError(
                    f"{chunk.seq.request_id}: {len(table)} blocks cannot hold {seq_len} tokens "
                    f"(block_size {block_size})"
                )
            block_ids = tuple(table[:num_blocks])
            first = block_ids[0] if block_ids else 0
            contiguous = block_ids == tuple(range(first, first + num_blocks))
            spans.append(SeqSpan(row, chunk.num_new_tokens, seq_len, block_ids,
                                 first * block_size if contiguous else None))
            for pos in range(chunk.start, seq_len):
                slots.append(block_ids[pos // block_size] * block_size + pos % block_size)
            row += chunk.num_new_tokens
        return cls.from_spans(spans, slots, block_size, device)

    @classmethod
    def from_spans(
        cls, spans: list[SeqSpan], slots: list[int], block_size: int, device: torch.device | str = "cpu"
    ) -> AttentionMetadata:
        max_blocks = max((len(s.block_ids) for s in spans), default=0)
        tables = [list(s.block_ids) + [0] * (max_blocks - len(s.block_ids)) for s in spans]
        total = spans[-1].query_start + spans[-1].query_len if spans else 0
        starts = [s.query_start for s in spans] + [total]
        tree_mask = None
        if any(s.tree is not None for s in spans):
            for s in spans:
                if s.tree is not None and (len(s.tree) != s.query_len or s.query_len > MAX_TREE_ROWS):
                    raise ValueError(f"a tree span needs one mask per query row (<= {MAX_TREE_ROWS}), got "
                                     f"{len(s.tree)} for {s.query_len} rows")
            bits = [_as_int64(b) for s in spans
                    for b in (s.tree if s.tree is not None else [-1] * s.query_len)]
            tree_mask = torch.tensor(bits, dtype=torch.int64, device=device)
        return cls(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens=torch.tensor([s.seq_len for s in spans], dtype=torch.int32, device=device),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=device).view(len(spans), max_blocks),
            max_query_len=max((s.query_len for s in spans), default=0),
            max_seq_len=max((s.seq_len for s in spans), default=0),
            block_size=block_size,
            spans=tuple(spans),
            tree_mask=tree_mask,
        )
