"""One eager target forward over tree verify chunks, and moving an accepted path's KV to consecutive slots."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.kv_cache import KVCache
from engine.model import LlamaModel
from engine.spec.tree import DraftTree
from kernels.attention.metadata import AttentionMetadata, SeqSpan


@dataclass(frozen=True)
class TreeChunk:
    """One sequence's tree verify: row r of `tree` is computed at slot start + r, position start + depth."""

    block_ids: tuple[int, ...]  # the sequence's blocks, covering start + tree.num_rows slots
    start: int  # tokens already in the cache; the root (the last committed token) is computed at it
    tree: DraftTree


def _slot(block_ids: Sequence[int], position: int, block_size: int) -> int:
    return block_ids[position // block_size] * block_size + position % block_size


def tree_verify_metadata(chunks: Sequence[TreeChunk], block_size: int,
                         device: torch.device) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """(input ids [T], RoPE positions [T], metadata) of one forward over the chunks' rows, in chunk order."""
    ids: list[int] = []
    positions: list[int] = []
    spans, slots = [], []
    for chunk in chunks:
        rows, end = chunk.tree.num_rows, chunk.start + chunk.tree.num_rows
        num_blocks = -(-end // block_size)
        if len(chunk.block_ids) < num_blocks:
            raise ValueError(f"{len(chunk.block_ids)} blocks cannot hold {end} tokens "
                             f"(block_size {block_size})")
        block_ids = tuple(chunk.block_ids[:num_blocks])
        first = block_ids[0]
        contiguous = block_ids == tuple(range(first, first + num_blocks))
        spans.append(SeqSpan(len(ids), rows, end, block_ids, first * block_size if contiguous else None,
                             tree=chunk.tree.ancestor_masks()))
        slots.extend(_slot(block_ids, p, block_size) for p in range(chunk.start, end))
        ids.extend(chunk.tree.tokens)
        positions.extend(chunk.tree.positions(chunk.start))
    meta = AttentionMetadata.from_spans(spans, slots, block_size, device)
    return (torch.tensor(ids, dtype=torch.long, device=device),
            torch.tensor(positions, dtype=torch.long, device=device), meta)


@torch.inference_mode()
def tree_verify_logits(model: LlamaModel, kv_cache: KVCache, chunks: Sequence[TreeChunk],
                       device: torch.device) -> list[torch.Tensor]:
    """Each chunk's target logits [rows, V] (row r: the token after row r's path), from one forward that
    stores every row's KV at its slot; walk them with engine.spec.tree.accept_tree_path."""
    ids, positions, meta = tree_verify_metadata(chunks, kv_cache.block_size, device)
    logits = model.compute_logits(model(ids, positions, meta, kv_cache))
    return list(logits.split([c.tree.num_rows for c in chunks]))


@torch.inference_mode()
def commit_path(kv_cache: KVCache, chunk: TreeChunk, rows: Sequence[int]) -> None:
    """Move the KV of the accepted path's rows (root first, ascending) to slots start, start + 1, …: the
    sequence's cache then reads as if the path had been decoded one token at a time. Slots past the path
    are left for later steps to overwrite, as after a rejected chain."""
    if list(rows) == list(range(len(rows))):
        return  # the path is already the leading rows (always so for a chain)
    size = kv_cache.block_size
    src = torch.tensor([_slot(chunk.block_ids, chunk.start + r, size) for r in rows], device=kv_cache.device)
    dst = torch.tensor([_slot(chunk.block_ids, chunk.start + i, size) for i in range(len(rows))],
                       device=kv_cache.device)
    per_slot = [*kv_cache.k, *kv_cache.v, *(t for ts in kv_cache.scales.values() for t in ts)]
    for tensor in per_slot:  # every one is [num_blocks, block_size, ...]
        flat = tensor.view(-1, *tensor.shape[2:])
        flat[dst] = flat[src]  # the gather reads every source before any write
