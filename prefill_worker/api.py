"""Typed messages of the prefill worker's actor methods (router <-> prefill worker)."""
from __future__ import annotations

from dataclasses import dataclass

from contracts.sampling import SamplingParams
from contracts.transfer import TransferTarget


@dataclass(frozen=True)
class PrefillRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    target: TransferTarget


@dataclass(frozen=True)
class PrefillResult:
    request_id: str
    first_token_id: int
    queue_seconds: float  # arrival at the worker -> first chunk scheduled
    prefill_seconds: float  # first chunk scheduled -> last layer computed
    transfer_exposed_seconds: float  # last layer computed -> every send completed


class PrefillFailed(RuntimeError):
    """Prefill or KV send failed; the decode side's reservation must be released by the caller."""
