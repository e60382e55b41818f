"""n-gram (prompt lookup) drafter: longest suffix first, latest match, bounded by k and the sequence's end."""
from __future__ import annotations

import pytest

from engine.spec.ngram import NgramDrafter, propose_ngram

pytestmark = pytest.mark.timeout(30)


def test_longest_suffix_match_wins_over_a_shorter_one() -> None:
    # Last 2 tokens (3, 4) occurred after 1 → continuation 9; last token alone (4) last occurred before 7.
    tokens = [1, 3, 4, 9, 8, 4, 7, 3, 4]
    assert propose_ngram(tokens, k=2, max_n=2) == [9, 8]
    assert propose_ngram(tokens, k=2, max_n=1) == [7, 3]


def test_most_recent_occurrence_is_used() -> None:
    tokens = [5, 1, 5, 2, 5]
    assert propose_ngram(tokens, k=1, max_n=1) == [2]


def test_no_recurring_suffix_proposes_nothing() -> None:
    assert propose_ngram([1, 2, 3, 4], k=3) == []
    assert propose_ngram([], k=3) == []
    assert propose_ngram([7], k=3) == []


def test_proposal_is_cut_at_k_and_at_the_sequence_end() -> None:
    tokens = [1, 2, 3, 4, 5, 6, 1, 2]
    assert propose_ngram(tokens, k=3) == [3, 4, 5]
    assert propose_ngram([6, 6], k=4) == [6]  # the match's continuation runs into the suffix itself


def test_min_n_stops_short_matches() -> None:
    assert propose_ngram([1, 9, 2, 9], k=2, max_n=3, min_n=2) == []


@pytest.mark.parametrize("k,min_n,max_n", [(0, 1, 3), (2, 0, 3), (2, 3, 2)])
def test_bad_arguments_raise(k: int, min_n: int, max_n: int) -> None:
    with pytest.raises(ValueError):
        propose_ngram([1, 2, 1], k=k, max_n=max_n, min_n=min_n)


def test_drafter_proposes_from_the_tokens_it_was_given() -> None:
    drafter = NgramDrafter(max_n=2)
    drafter.accept([4, 5, 6, 4, 5], None)
    assert drafter.propose(3) == [6, 4, 5]
