"""Prompt-lookup drafting: continue the sequence's own earlier text after its latest n-gram match."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.spec.drafter import Drafter


def propose_ngram(tokens: Sequence[int], k: int, max_n: int = 3, min_n: int = 1) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the last n tokens, trying n from
    max_n down to min_n; [] when no suffix recurs. A recent match wins: local repetition predicts best."""
    if k < 1 or min_n < 1 or max_n < min_n:
        raise ValueError(f"need k >= 1 and 1 <= min_n <= max_n, got k={k}, min_n={min_n}, max_n={max_n}")
    tokens = list(tokens)
    end = len(tokens)
    for n in range(min(max_n, end - 1), min_n - 1, -1):
        suffix = tokens[end - n:]
        for start in range(end - n - 1, -1, -1):  # every earlier start; the suffix itself is excluded
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + k]
    return []


class NgramDrafter(Drafter):
    """`propose_ngram` over one sequence's tokens (prompt included); needs no model and no features."""

    needs_features = False

    def __init__(self, max_n: int = 3, min_n: int = 1) -> None:
        self.max_n, self.min_n = max_n, min_n
        self.tokens: list[int] = []

    def accept(self, token_ids: Sequence[int], features: torch.Tensor | None) -> None:
        self.tokens = list(token_ids)

    def propose(self, k: int) -> list[int]:
        return propose_ngram(self.tokens, k, self.max_n, self.min_n)
