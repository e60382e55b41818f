"""A step's sampling when verify chunks carry draft distributions: those chunks are rejection-sampled."""
from __future__ import annotations

import torch

from engine.executors.batch_inputs import SamplingRows
from engine.sampler import sample
from engine.spec.rejection import rejection_verify


def sample_rows(logits: torch.Tensor, rows: SamplingRows) -> torch.Tensor:
    """One id per row of `logits` [R, V] (rows as `rows.rows`), int64 [R] on logits' device.

    Chunks without draft distributions sample each position by (seed, position) (`engine.sampler.sample`);
    a verify chunk with `draft_probs` gets its k + 1 rows from `rejection_verify` instead: the accepted
    drafts, the target's token after them, then -1 (positions past a rejection sample nothing), so the
    scheduler's "keep drafts while equal" reads back the accepted count.
    """
    token_ids = sample(logits, rows.params, rows.positions)
    if not rows.rejection_sampled:
        return token_ids
    verify, offsets, row = [], [], 0
    for chunk, count in zip(rows.chunks, rows.num_sampled, strict=True):
        if chunk.draft_probs is not None:
            verify.append(chunk)
            offsets.append(row)
        row += count
    device, vocab = logits.device, logits.shape[1]
    k = max(len(c.draft_token_ids) for c in verify)
    target = logits.new_zeros(len(verify), k + 1, vocab)
    draft_ids = torch.full((len(verify), k), -1, dtype=torch.int64)
    draft_probs = torch.zeros(len(verify), k, vocab, dtype=torch.float32, device=device)
    flat_rows = []
    for i, (chunk, offset) in enumerate(zip(verify, offsets, strict=True)):
        n = len(chunk.draft_token_ids)
        target[i, :n + 1] = logits[offset:offset + n + 1]
        draft_ids[i, :n] = torch.tensor(chunk.draft_token_ids)
        draft_probs[i, :n] = chunk.draft_probs.to(device=device, dtype=torch.float32)
        flat_rows.append((offset, n + 1))
    num_drafts = torch.tensor([len(c.draft_token_ids) for c in verify], device=device)
    first_positions = [rows.positions[o] for o in offsets]
    verified = rejection_verify(target, [c.seq.sampling for c in verify], first_positions,
                                draft_ids.to(device), draft_probs, num_drafts)
    src = torch.tensor([i * (k + 1) + j for i, (_, n) in enumerate(flat_rows) for j in range(n)])
    dst = torch.tensor([o + j for o, n in flat_rows for j in range(n)])
    token_ids = token_ids.clone()
    token_ids[dst.to(device)] = verified.token_ids.flatten()[src.to(device)]
    return token_ids
