"""What a chain drafter is: told each accepted prefix, proposes the next k tokens of one sequence."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch


class Drafter(ABC):
    """One sequence's drafter. After the prompt and after each verify, `accept` gets every token so far and
    the target's features [n, F·H] for the n positions computed since the last call (positions whose next
    token is now known); `propose(k)` then drafts the tokens after the last one (fewer, or none, allowed).

    `draft_probs`: after `propose`, the distributions [len(drafts), target vocab] (float32) a sampling
    drafter drew those drafts from, processed like the target's (engine.sampler.processed_probs) — the
    verify then rejection-samples them; None for deterministic drafts (kept while they equal the target's
    own seeded draws)."""

    needs_features: bool
    draft_probs: torch.Tensor | None = None

    @abstractmethod
    def accept(self, token_ids: Sequence[int], features: torch.Tensor | None) -> None: ...

    @abstractmethod
    def propose(self, k: int) -> list[int]: ...
