"""The scheduler's config and what it hands the executor: one step's chunks."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from contracts.config_checks import require_at_least
from engine.config import check_prefill_fairness
from engine.sequence import Sequence

if TYPE_CHECKING:
    import torch

    from engine.spec.tree import DraftTree


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_tokens: int
    max_num_seqs: int
    block_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...] = ()
    # Decode steps also take blocks for this many tokens past the step, when free (never by preempting): the
    # decode lookahead (engine/executors/lookahead.py) writes the next position's KV before scheduling.
    lookahead_tokens: int = 0
    # New sequences start after their cached full blocks (engine/prefix_cache.py).
    prefix_caching: bool = False
    # Fair prefill (vLLM's long_prefill_token_threshold / max_long_partial_prefills): a prompt with more than
    # this many tokens left is long; while others run or wait, a long prompt computes at most this many per
    # step, and at most max_long_partial_prefills long prompts progress at once (later short ones start
    # meanwhile). 0 = off: one prompt may take the whole budget.
    long_prefill_token_threshold: int = 0
    max_long_partial_prefills: int = 1
    # Split-fused steps (engine/step_cost.py): with decodes in a step, its prefill tokens are paid from a
    # time credit that decode steps earn, so the batch's steps take on average at most this many times its
    # decode-only steps, by the costs this scheduler timed (schedule -> postprocess). 0 = off.
    fused_step_max_slowdown: float = 0.0

    def __post_init__(self) -> None:
        require_at_least(self, 1, "max_batch_tokens", "max_num_seqs", "block_size", "max_model_len")
        check_prefill_fairness(self)
        require_at_least(self, 0, "lookahead_tokens")


@dataclass(frozen=True)
class ScheduledChunk:
    """One sequence's share of a step: positions start .. start + num_new_tokens - 1 are computed."""

    seq: Sequence  # its block_table already covers start + num_new_tokens tokens
    start: int  # == seq.num_computed_tokens when scheduled
    num_new_tokens: int  # tokens computed this step, verify positions included
    # Trailing positions whose next token is sampled: 0 mid-prompt, 1 at a prompt's end or a decode step,
    # k + 1 for a verify step over k draft tokens.
    num_sampled: int
    # Verify positions: the last len(draft_token_ids) tokens computed are these proposals (not yet in
    # seq.token_ids); a snapshot, so proposals made after scheduling do not change this step.
    draft_token_ids: tuple[int, ...] = ()
    # [len(draft_token_ids), vocab]: the distributions a sampling drafter drew the drafts from, processed like
    # the target's (engine.sampler.processed_probs). Set: the verify is rejection-sampled
    # (engine/spec/rejection.py); None: drafts are kept while they equal the target's own seeded draws.
    draft_probs: torch.Tensor | None = field(default=None, compare=False, repr=False)
    # A tree verify (engine/spec/tree.py): the drafts are its rows 1.., computed at slots start + row and
    # positions start + depth, each attending to its ancestors; None: a chain (causal rows).
    tree: DraftTree | None = None

    @property
    def token_ids(self) -> list[int]:
        """The tokens computed this step, in position order (draft tokens last)."""
        end = self.start + self.num_new_tokens - len(self.draft_token_ids)
        tokens = self.seq.token_ids[self.start:end]
        return tokens + list(self.draft_token_ids) if self.draft_token_ids else tokens

    @property
    def positions(self) -> list[int]:
        """Each computed token's position (RoPE), in row order."""
        if self.tree is not None:
            return self.tree.positions(self.start)
        return list(range(self.start, self.start + self.num_new_tokens))

    @property
    def output_start(self) -> int:
        """Index in seq.token_ids of the first token postprocess appends for this (sampling) chunk."""
        return self.start + self.num_new_tokens - len(self.draft_token_ids)


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: tuple[ScheduledChunk, ...]
    preempted: tuple[Sequence, ...]
    # Some sequence waits or runs outside this step, so the next step will not be these chunks one position
    # on: a decode lookahead (engine/executors/lookahead.py) launches nothing ahead of this one.
    others_waiting: bool = False

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks

    @property
    def has_tree(self) -> bool:
        """Whether a chunk is a tree verify: CUDA graphs never replay those (eager and CPU flat paths do)."""
        return any(c.tree is not None for c in self.chunks)
