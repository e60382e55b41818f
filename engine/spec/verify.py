"""The verify rule: which leading drafts of a verify step the target keeps."""
from __future__ import annotations

from collections.abc import Sequence


def accepted_prefix(drafts: Sequence[int], sampled: Sequence[int]) -> int:
    """How many leading drafts equal the token the target sampled at their position.

    Exact for deterministic drafts (greedy at T = 0; at T > 0 each position is drawn with (seed, position),
    so a kept draft is the token a single step would have drawn). Sampled drafts are rejection-sampled by
    the executor (engine/spec/rejection.py), whose rows are the kept drafts, then a token that differs from
    the draft it replaces, then -1: this rule reads back their accepted count too.
    """
    accepted = 0
    while accepted < len(drafts) and sampled[accepted] == drafts[accepted]:
        accepted += 1
    return accepted
