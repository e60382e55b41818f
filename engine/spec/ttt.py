"""The draft head's training-time-test loss: step 0 reads the target's features, later steps its own."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.spec.draft_head import DraftHead, train_attention_mask


@dataclass(frozen=True)
class Batch:
    """Padded sequences: token embeddings [B, N, H], target features [B, N, F·H] of each position, and the
    draft-vocabulary label of each position's token [B, N] (-1: no loss — prompt, padding, outside the
    subset)."""

    emb: torch.Tensor
    features: torch.Tensor
    labels: torch.Tensor


def _shift(x: torch.Tensor, by: int, length: int, fill: float | int) -> torch.Tensor:
    """x[:, by:by + length] along dim 1, padded with `fill` where it runs past the end."""
    part = x[:, by:by + length]
    missing = length - part.shape[1]
    if missing <= 0:
        return part
    pad = torch.full((x.shape[0], missing, *x.shape[2:]), fill, dtype=x.dtype, device=x.device)
    return torch.cat([part, pad], dim=1)


def unroll(head: DraftHead, batch: Batch, steps: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(logits [B, L, S], labels [B, L]) of each of `steps` unrolled draft steps, L = N - 1 rows.

    Row t of step j sits at position t + j, reads the token at t + 1 + j and predicts the one at t + 2 + j
    (position t + 1 + j's greedy target token). Step 0's feature is the target's at t; step j's is step j-1's
    output for the same row, as when drafting. Row t attends to step 0's rows ≤ t and to its own rows of
    steps 1..j (train_attention_mask): at inference those are the accepted positions and the chain so far.
    """
    length = batch.emb.shape[1] - 1
    device = batch.emb.device
    g = head.fuse(batch.features[:, :length])
    keys, values = [], []
    for step in range(steps):
        emb = _shift(batch.emb, 1 + step, length, 0.0)
        q, k, v = head.qkv(emb, g, torch.arange(length, device=device) + step)
        keys.append(k)
        values.append(v)
        mask = train_attention_mask(length, step, device)
        g = head.finish(g, q, torch.cat(keys, dim=2), torch.cat(values, dim=2), mask)
        yield head.logits(g), _shift(batch.labels, 2 + step, length, -1)


def ttt_loss(head: DraftHead, batch: Batch, steps: int, decay: float = 0.8
             ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """(weighted mean cross-entropy over `steps` unrolled draft steps (`unroll`), per step (correct,
    counted)). Later steps weigh `decay`**j: their errors matter only after the earlier drafts were right.
    """
    total = torch.zeros((), device=batch.emb.device)
    weights = 0.0
    stats = []
    for step, (logits, labels) in enumerate(unroll(head, batch, steps)):
        valid = labels >= 0
        if valid.any():
            total = total + decay ** step * F.cross_entropy(logits[valid], labels[valid])
            weights += decay ** step
        correct = int((logits.argmax(-1)[valid] == labels[valid]).sum())
        stats.append((correct, int(valid.sum())))
    return total / max(weights, 1e-9), stats
