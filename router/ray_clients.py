"""DecodeClient/PrefillClient over Ray actor handles; the only router module that imports ray."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any, TypeVar

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from contracts.stats import WorkerInfo
from decode_worker.api import NoCapacity, Reservation, ReserveRequest, TokenChunk
from prefill_worker.api import PrefillFailed, PrefillRequest, PrefillResult
from router.clients import DecodeClient, PrefillClient, WorkerUnavailable

T = TypeVar("T")

# Errors the worker raises on purpose; they reach the router as themselves, not wrapped in RayTaskError.
_TYPED_ERRORS = (NoCapacity, PrefillFailed)


@contextlib.contextmanager
def _ray_errors(worker_id: str, method: str) -> Iterator[None]:
    """Turn Ray's wrappers into the router's typed errors so request flow code never sees ray exceptions."""
    try:
        yield
    except RayTaskError as e:
        if isinstance(e.cause, _TYPED_ERRORS):
            raise e.cause from None
        raise WorkerUnavailable(f"{worker_id}.{method} failed: {type(e.cause).__name__}: {e.cause}") from e
    except RayActorError as e:
        raise WorkerUnavailable(f"{worker_id} is gone ({type(e).__name__})") from e
    except RayError as e:
        raise WorkerUnavailable(f"{worker_id}.{method}: {type(e).__name__}: {e}") from e


class _RayWorker:
    def __init__(self, worker_id: str, handle: Any) -> None:
        self._handle = handle
        self._worker_id = worker_id

    @property
    def worker_id(self) -> str:
        return self._worker_id

    async def _call(self, method: str, *args: Any) -> Any:
        with _ray_errors(self._worker_id, method):
            ref: Awaitable[Any] = getattr(self._handle, method).remote(*args)
            return await ref

    async def info(self) -> WorkerInfo:
        return await self._call("info")

    async def abort(self, request_id: str) -> bool:
        return await self._call("abort", request_id)

    async def metrics_text(self) -> str:
        return await self._call("metrics_text")


class RayDecodeClient(_RayWorker, DecodeClient):
    """`RayDecodeClient(worker_id, handle)`, or `await RayDecodeClient.connect(handle)` to ask its id."""

    @classmethod
    async def connect(cls, handle: Any) -> RayDecodeClient:
        with _ray_errors("decode worker", "info"):
            info: WorkerInfo = await handle.info.remote()
        return cls(info.worker_id, handle)

    async def reserve(self, request: ReserveRequest) -> Reservation:
        return await self._call("reserve", request)

    async def recompute(self, request_id: str) -> bool:
        return await self._call("recompute", request_id)

    async def stream(self, request_id: str) -> AsyncIterator[TokenChunk]:
        gen = self._handle.stream.options(num_returns="streaming").remote(request_id)
        exhausted = False
        try:
            while True:
                with _ray_errors(self._worker_id, "stream"):
                    try:
                        ref = await gen.__anext__()
                    except StopAsyncIteration:
                        exhausted = True
                        return
                    chunk: TokenChunk = await ref
                exhausted = chunk.finish_reason is not None
                yield chunk
        finally:
            if not exhausted:
                # The consumer left early (cancel, failure): stop the remote generator task too, best effort;
                # freeing KV is the job of the explicit abort call.
                with contextlib.suppress(Exception):
                    ray.cancel(gen)


class RayPrefillClient(_RayWorker, PrefillClient):
    """`RayPrefillClient(worker_id, handle)`, or `await RayPrefillClient.connect(handle)` to ask its id."""

    @classmethod
    async def connect(cls, handle: Any) -> RayPrefillClient:
        with _ray_errors("prefill worker", "info"):
            info: WorkerInfo = await handle.info.remote()
        return cls(info.worker_id, handle)

    async def prefill(self, request: PrefillRequest) -> PrefillResult:
        return await self._call("prefill", request)
