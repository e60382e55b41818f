"""Typed messages of the decode worker's actor methods (router <-> decode worker)."""
from __future__ import annotations

from dataclasses import dataclass

from contracts.sampling import FinishReason, SamplingParams


@dataclass(frozen=True)
class ReserveRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    prefill_locally: bool = False  # conditional disaggregation: decode worker prefills it itself
    # Migration: the last `num_resumed_tokens` ids of `prompt_token_ids` were generated (and streamed) by an
    # earlier worker; they count as output for the detokenizer, so text and stop strings continue seamlessly.
    num_resumed_tokens: int = 0


@dataclass(frozen=True)
class Reservation:
    request_id: str
    decode_id: str
    block_ids: tuple[int, ...]  # empty when prefill_locally
    # Tokens whose KV the decode worker already holds (its prefix cache): the transfer starts here.
    start_token: int = 0


@dataclass(frozen=True)
class TokenChunk:
    """One streamed step: new token ids and the text they completed; `finish_reason` set on the last chunk."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    # Set with finish_reason ABORT when the worker failed the request (e.g. KV transfer).
    error: str | None = None
    # The worker itself failed (its engine thread died), not this request: the router may migrate it.
    worker_failed: bool = False
    # Speculative decoding in the step that produced this chunk: drafts verified, and how many were kept.
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0


class NoCapacity(RuntimeError):
    """Not enough free KV blocks for the prompt right now (router retries another worker or queues)."""
