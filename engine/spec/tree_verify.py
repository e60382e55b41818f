"""Tree verify: one eager target forward over tree chunks, the walk, and moving the path's KV into place."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from engine.kv_cache import KVCache
from engine.model import LlamaModel
from engine.scheduler_types import ScheduledChunk
from engine.spec.tree import DraftTree, accept_tree_path, greedy_tree_path
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


def walk_trees(logits: torch.Tensor, chunks: Sequence[ScheduledChunk], num_sampled: Sequence[int],
               token_ids: torch.Tensor, kv_cache: KVCache) -> torch.Tensor:
    """A step's sampled ids [R] with each tree chunk's rows replaced by `walk_tree`'s. logits [R, V]: the
    sampling rows, `chunks` with `num_sampled` of them each, in order (batch_inputs.SamplingRows)."""
    token_ids = token_ids.clone()
    row = 0
    for chunk, count in zip(chunks, num_sampled, strict=True):
        if chunk.tree is not None:
            ids = walk_tree(chunk, lambda r, first=row: logits[first + r], kv_cache)
            token_ids[row:row + count] = torch.tensor(ids, dtype=token_ids.dtype)
        row += count
    return token_ids


def walk_tree(chunk: ScheduledChunk, row_logits: Callable[[int], torch.Tensor],
              kv_cache: KVCache) -> list[int]:
    """A tree verify's sampled ids: the walk's tokens — the accepted path's drafts, the target's token after
    them — then -1 for the remaining rows (engine.spec.verify.num_accepted reads the count back). The path's
    KV is moved to consecutive slots (`commit_path`) before postprocess rolls the rest back. row_logits(r):
    the target's logits [V] after tree row r; a greedy walk asks only for its path's rows."""
    tree, seq = chunk.tree, chunk.seq
    if seq.sampling.greedy:
        walk = greedy_tree_path(tree, row_logits)
    else:
        logits = torch.stack([row_logits(r) for r in range(tree.num_rows)])
        walk = accept_tree_path(tree, logits, seq.sampling, chunk.start + 1)
    commit_path(kv_cache, TreeChunk(tuple(seq.block_table), chunk.start, tree), walk.rows)
    return [*walk.token_ids, *[-1] * (tree.num_rows - len(walk.token_ids))]
