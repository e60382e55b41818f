"""A batch's flat model inputs (token ids, positions, attention metadata) and the rows that sample."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.scheduler import ScheduledChunk
from kernels.attention.metadata import AttentionMetadata


def tree_metadata(chunks: Sequence[ScheduledChunk], block_size: int,
                  device: torch.device) -> AttentionMetadata:
    """from_chunks' metadata with each tree chunk's rows masked to their ancestors (SeqSpan.tree)."""
    host = AttentionMetadata.from_chunks(chunks, block_size, "cpu")
    spans = [span if chunk.tree is None else dataclasses.replace(span, tree=chunk.tree.ancestor_masks())
             for span, chunk in zip(host.spans, chunks, strict=True)]
    return AttentionMetadata.from_spans(spans, host.slot_mapping.tolist(), block_size, device)


def prepare_inputs(chunks: Sequence[ScheduledChunk], block_size: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """(input_ids [T], positions [T], metadata), rows in chunk order, verify positions included."""
    token_ids: list[int] = []
    positions: list[int] = []
    for chunk in chunks:
        token_ids.extend(chunk.token_ids)
        positions.extend(chunk.positions)
    if any(c.tree is not None for c in chunks):
        meta = tree_metadata(chunks, block_size, device)
    else:
        meta = AttentionMetadata.from_chunks(chunks, block_size, device)
    ids = torch.tensor(token_ids, dtype=torch.long, device=device)
    pos = torch.tensor(positions, dtype=torch.long, device=device)
    return ids, pos, meta


@dataclass(frozen=True)
class SamplingRows:
    """Which rows of a flat batch sample, and what the sampler needs to know about each."""

    rows: list[int]  # flat rows whose next token is sampled, chunk by chunk, in position order
    last_rows: list[int]  # per sampling chunk: its last row (the draft-feature row)
    seqs: tuple  # per sampling chunk: its sequence
    num_sampled: tuple[int, ...]  # per sampling chunk: how many of `rows` are its
    params: list  # per row: its sequence's SamplingParams
    positions: list[int]  # per row: the index its sampled token takes in the sequence (seeds the draw)
    # Per sampling chunk: its scheduled chunk, for the verify chunks whose drafts carry probabilities.
    chunks: tuple[ScheduledChunk, ...] = ()

    @property
    def one_each(self) -> bool:
        return len(self.rows) == len(self.seqs)

    @property
    def rejection_sampled(self) -> bool:
        """Whether some verify chunk is rejection-sampled (its drafts carry their distributions)."""
        return any(c.draft_probs is not None for c in self.chunks)

    @classmethod
    def of(cls, chunks: Sequence[ScheduledChunk]) -> SamplingRows:
        rows: list[int] = []
        last_rows: list[int] = []
        seqs, counts, params, positions, sampling = [], [], [], [], []
        start = 0
        for chunk in chunks:
            end = start + chunk.num_new_tokens
            if chunk.num_sampled:
                first = end - chunk.num_sampled
                rows.extend(range(first, end))
                last_rows.append(end - 1)
                seqs.append(chunk.seq)
                sampling.append(chunk)
                counts.append(chunk.num_sampled)
                params.extend([chunk.seq.sampling] * chunk.num_sampled)
                position = chunk.start + chunk.num_new_tokens - chunk.num_sampled
                positions.extend(range(position + 1, position + 1 + chunk.num_sampled))
            start = end
        return cls(rows, last_rows, tuple(seqs), tuple(counts), params, positions, tuple(sampling))
