"""Chain drafts from a DraftHead for one sequence, over the head's own KV of the accepted positions."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from contracts.sampling import SamplingParams
from engine.sampler import processed_probs, race_noise
from engine.spec.draft_head import DraftHead
from engine.spec.drafter import Drafter
from engine.spec.rejection import draft_seed


class HeadDrafter(Drafter):
    """Position i's head input is [embedding of token i+1 ‖ fused target features of i]; its output predicts
    token i+2 and stands in for the features of i+1 in the next draft step (the head reads its own output).

    `accept` appends accepted positions to the head's KV; `propose` drafts on a copy that is then dropped,
    so rejected drafts need no rollback. `draft_vocab_limit` drafts only over the first (most frequent) ids
    of the head's subset, to measure what a smaller subset costs. `first_position`: the first position whose
    features it gets (a prefix-cached or transferred prompt brings only its last rows); earlier positions
    are simply not in the head's KV (it was trained on windows of the context, docs/speculative.md).

    `sampling`: the request's parameters. Greedy (or None) drafts the head's argmax; at T > 0 each draft is
    sampled from the head's distribution processed with the request's temperature / top-k / top-p, drawn
    with (draft_seed(seed), position) — never the verifier's noise — and `draft_probs` holds those
    distributions over the full target vocabulary (the head's subset mapped through d2t, 0 elsewhere).
    """

    needs_features = True

    def __init__(self, head: DraftHead, embed: nn.Embedding, draft_vocab_limit: int | None = None,
                 first_position: int = 0, sampling: SamplingParams | None = None) -> None:
        self.head = head
        self.embed = embed
        self.limit = draft_vocab_limit
        self.num_committed = first_position  # positions from here on go into the head's KV
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._last: torch.Tensor | None = None
        self.sampling = None if sampling is None or sampling.greedy else sampling
        # The draws' own params: the same processing, the drafter's salted seed (None stays unseeded).
        self._draw_params = (None if self.sampling is None or self.sampling.seed is None
                             else dataclasses.replace(self.sampling, seed=draft_seed(self.sampling.seed)))

    # Read through properties: SlotHeadDrafter (engine/spec/head_slots.py) keeps them in shared buffers.
    @property
    def k(self) -> torch.Tensor | None:
        """The head's keys of the accepted positions [1, Hk, n, D] (None before any)."""
        return self._k

    @property
    def v(self) -> torch.Tensor | None:
        return self._v

    @property
    def last(self) -> torch.Tensor | None:
        """The block output of the last accepted position [1, 1, H] (None before any)."""
        return self._last

    def _run(self, token_ids: Sequence[int], g: torch.Tensor, start: int,
             k_cache: torch.Tensor | None, v_cache: torch.Tensor | None):
        """Rows at positions start.. with their next tokens and features g [1, T, H] → (a, k, v) caches."""
        device = g.device
        emb = self.embed(torch.tensor([list(token_ids)], device=device)).to(g.dtype)
        positions = torch.arange(start, start + g.shape[1], device=device)
        q, k, v = self.head.qkv(emb, g, positions)
        if k_cache is not None:
            k, v = torch.cat([k_cache, k], dim=2), torch.cat([v_cache, v], dim=2)
        t, total = g.shape[1], k.shape[2]
        mask = torch.ones(t, total, dtype=torch.bool, device=device).tril(total - t)
        return self.head.finish(g, q, k, v, mask), k, v

    @torch.no_grad()
    def accept(self, token_ids: Sequence[int], features: torch.Tensor | None) -> None:
        if features is None:
            raise ValueError("the draft head needs the target's features")
        self.accept_fused(token_ids, self.head.fuse(features.to(self.head.fc.weight.dtype)))

    @torch.no_grad()
    def accept_fused(self, token_ids: Sequence[int], g: torch.Tensor) -> None:
        """`accept` with the features already fused ([n, H]): as a prefill worker ships them."""
        start, n = self.num_committed, g.shape[0]
        if start + n != len(token_ids) - 1:
            raise ValueError(
                f"{n} feature rows after {start} accepted positions, but {len(token_ids)} tokens")
        if n == 0:
            return
        self._append(token_ids[start + 1:], g.to(self.head.fc.weight.dtype))
        self.num_committed = start + n

    def _append(self, next_ids: Sequence[int], g: torch.Tensor) -> None:
        """The head's rows at positions num_committed.. (next tokens, fused features [n, H]) into its KV."""
        a, self._k, self._v = self._run(next_ids, g.unsqueeze(0), self.num_committed, self._k, self._v)
        self._last = a[:, -1:]

    def _draft(self, a: torch.Tensor, position: int, probs: list[torch.Tensor]) -> int:
        """The draft that takes index `position` of the sequence; a sampled one appends its q to `probs`."""
        logits = self.head.logits(a[0, -1])
        d2t = self.head.d2t
        if self.limit is not None:
            logits, d2t = logits[:self.limit], d2t[:self.limit]
        if self.sampling is None:
            return int(d2t[int(logits.argmax())])
        # Top-k / top-p over the subset equal them over a target-vocab row that is -inf off the subset.
        q = processed_probs(logits.unsqueeze(0), [self.sampling])  # [1, S] float32
        params = self._draw_params or self.sampling
        noise = race_noise([params], [position], q.shape, q.device)
        choice = int((q / noise).argmax())  # the exponential race: choice ~ q
        probs.append(q.new_zeros(self.head.config.target_vocab_size).index_copy_(0, d2t, q[0]))
        return int(d2t[choice])

    @torch.no_grad()
    def propose(self, k: int) -> list[int]:
        self.draft_probs = None
        if self.last is None:
            return []
        probs: list[torch.Tensor] = []
        first = self.num_committed + 1  # the index the first draft takes in the sequence
        drafts = [self._draft(self.last, first, probs)]
        a, k_cache, v_cache = self.last, self.k, self.v
        while len(drafts) < k:
            position = self.num_committed + len(drafts) - 1
            a, k_cache, v_cache = self._run(drafts[-1:], a, position, k_cache, v_cache)
            drafts.append(self._draft(a, first + len(drafts), probs))
        if probs:
            self.draft_probs = torch.stack(probs)
        return drafts
