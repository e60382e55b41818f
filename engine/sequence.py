"""One request's state as it moves through scheduler, model runner and KV transfer."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from contracts.sampling import FinishReason, SamplingParams

if TYPE_CHECKING:
    import torch

    from engine.spec.tree import DraftTree


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # has tokens to compute, holds no blocks yet (or was preempted)
    AWAITING_KV = "awaiting_kv"  # decode side: blocks reserved, KV arriving from a prefill worker
    RUNNING = "running"  # holds blocks, scheduled every step
    FINISHED = "finished"


@dataclass
class Sequence:
    """Carrier object: `num_tokens` vs `num_computed_tokens` is all the scheduler needs (no phases)."""

    request_id: str
    token_ids: list[int]
    sampling: SamplingParams
    num_prompt_tokens: int = -1
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    # Set by the prefill side for speculative decoding later: hidden state of the last prompt position.
    draft_features: object | None = None
    # Proposed continuation (speculative decoding): the scheduler computes them after the last token as
    # verify positions; postprocess keeps the ones the target model samples too and clears the list.
    draft_token_ids: list[int] = field(default_factory=list)
    # [len(draft_token_ids), vocab] float32: the distributions sampled drafts were drawn from (the head at
    # T > 0), handed to the verify chunk as ScheduledChunk.draft_probs; None for deterministic drafts.
    draft_probs: torch.Tensor | None = None
    # Tree drafts (SpecConfig.tree_branching): the tree whose drafted rows draft_token_ids lists in row order;
    # None for chains.
    draft_tree: DraftTree | None = None
    # Speculation totals over the request's verify steps: drafts proposed, drafts kept (appended as output).
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    # Prefix cache (engine/prefix_cache.py): chain hashes of full blocks of token_ids, computed as needed, and
    # how many leading blocks of block_table are named in the cache (shared ones, or ones this one computed).
    block_hashes: list[int] = field(default_factory=list)
    num_cached_blocks: int = 0

    def __post_init__(self) -> None:
        if self.num_prompt_tokens < 0:
            self.num_prompt_tokens = len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncomputed(self) -> int:
        """Tokens whose KV is not computed yet (the prompt's rest while prefilling, 1 while decoding)."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def stop_reason(self, eos_token_ids: tuple[int, ...], max_len: int) -> FinishReason | None:
        """Why the sequence ends at its last token (EOS or a stop token; max_tokens or the context window
        reached), or None if it goes on."""
        token_id, params = self.token_ids[-1], self.sampling
        if (token_id in eos_token_ids and not params.ignore_eos) or token_id in params.stop_token_ids:
            return FinishReason.STOP
        if self.num_output_tokens >= params.max_tokens or self.num_tokens >= max_len:
            return FinishReason.LENGTH
        return None
