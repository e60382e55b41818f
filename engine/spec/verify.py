"""The verify rule: which drafts of a verify step the target keeps; a decode step's verify chunk."""
from __future__ import annotations

from collections.abc import Sequence

from engine.scheduler_types import ScheduledChunk
from engine.sequence import Sequence as Seq


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


def num_accepted(chunk: ScheduledChunk, sampled: Sequence[int]) -> int:
    """Drafts of `chunk` the target kept, from the ids the executor sampled for it. A tree verify's ids
    are its walk's tokens — the accepted path's drafts, the target's token, then -1 for every other row
    (engine/spec/tree_verify.py) — so all of them but the target's token were accepted."""
    if chunk.tree is not None:
        return sum(token >= 0 for token in sampled) - 1
    return accepted_prefix(chunk.draft_token_ids, sampled)


def decode_chunk(seq: Seq, drafts: tuple[int, ...]) -> ScheduledChunk:
    """seq's decode step: its last token, then the first len(drafts) of its drafts as verify rows (the
    scheduler cut them to budget and context). A tree's first rows are a tree too; cut to a chain, it
    verifies as one (the chain paths: CUDA graphs, the CPU flat rows)."""
    n = 1 + len(drafts)
    probs = None if not drafts or seq.draft_probs is None else seq.draft_probs[:len(drafts)]
    tree = None if seq.draft_tree is None or not drafts else seq.draft_tree.prefix(n)
    if tree is not None and tree.is_chain:
        tree = None
    return ScheduledChunk(seq, seq.num_computed_tokens, n, n, drafts, probs, tree)
