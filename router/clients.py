"""The interfaces the router reaches workers through: DecodeClient, PrefillClient (Ray or fakes behind)."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator

from contracts.stats import WorkerInfo
from decode_worker.api import Reservation, ReserveRequest, TokenChunk
from prefill_worker.api import PrefillRequest, PrefillResult


class WorkerUnavailable(RuntimeError):
    """The worker cannot be reached (process died, actor gone, transport failure)."""


class WorkerClient(abc.ABC):
    """Calls shared by both roles. Every method may raise WorkerUnavailable; none blocks forever by design of
    the worker, but the router still bounds control calls with a timeout."""

    @property
    @abc.abstractmethod
    def worker_id(self) -> str:
        """Stable id, equal to `info().worker_id`; names the worker in metrics, timings and dispatch."""

    @abc.abstractmethod
    async def info(self) -> WorkerInfo:
        """Current state ("starting" | "ready" | "failed") and load snapshot."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> bool:
        """Drop the request and free its KV blocks; True if the worker still knew it. Idempotent."""

    @abc.abstractmethod
    async def metrics_text(self) -> str:
        """Prometheus text exposition of the worker's own metric registry."""


class DecodeClient(WorkerClient):
    @abc.abstractmethod
    async def reserve(self, request: ReserveRequest) -> Reservation:
        """Reserve KV blocks for the prompt (or admit it for local prefill).
        Raises decode_worker.api.NoCapacity."""

    @abc.abstractmethod
    async def recompute(self, request_id: str) -> bool:
        """The prompt's KV will not arrive (its prefill worker failed): prefill it on this worker instead.
        False if the request awaits no KV here any more."""

    @abc.abstractmethod
    def stream(self, request_id: str) -> AsyncIterator[TokenChunk]:
        """Token chunks of a reserved request as they are generated; the last one has `finish_reason` set.
        Closing the iterator early does not abort the request: call `abort`."""


class PrefillClient(WorkerClient):
    @abc.abstractmethod
    async def prefill(self, request: PrefillRequest) -> PrefillResult:
        """Prefill the prompt and stream its KV into `request.target`; returns when every send completed.
        Raises prefill_worker.api.PrefillFailed (the caller releases the decode reservation)."""
