"""Adaptive draft length: starts at k, falls to 1 when drafts are rejected, climbs back when accepted."""
from __future__ import annotations

import pytest

from engine.spec.adaptive import AdaptiveK
from engine.spec.verify import accepted_prefix


def test_draft_length_follows_acceptance_within_one_to_k() -> None:
    length = AdaptiveK(5)
    assert length.k == 5
    for _ in range(4):
        length.update(drafted=length.k, accepted=0)
    assert length.k == 1
    length.update(drafted=0, accepted=0)  # a step without drafts teaches nothing
    assert length.k == 1
    for _ in range(10):
        length.update(drafted=length.k, accepted=length.k)
    assert length.k == 5


def test_fixed_k_ignores_acceptance() -> None:
    length = AdaptiveK(3, adaptive=False)
    length.update(drafted=3, accepted=0)
    assert length.k == 3
    with pytest.raises(ValueError):
        AdaptiveK(0)


def test_accepted_prefix_stops_at_the_first_mismatch() -> None:
    assert accepted_prefix([4, 5, 6], [4, 5, 7, 9]) == 2
    assert accepted_prefix([4, 5], [4, 5, 8]) == 2
    assert accepted_prefix([], [3]) == 0
    assert accepted_prefix([1], [2, 1]) == 0
