"""DecodeClient/PrefillClient over Ray actor handles; the only router module that imports ray."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any, Self, TypeVar

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
    """What both Ray clients share: the actor handle, typed errors, the calls all workers answer."""

    ROLE = "worker"  # named in the error when `connect` finds no worker behind the handle

    @classmethod
    async def connect(cls, handle: Any) -> Self:
        """The client of the worker behind `handle`, its id asked from the worker itself."""
        with _ray_errors(f"{cls.ROLE} worker", "info"):
            info: WorkerInfo = await handle.info.remote()
        return cls(info.worker_id, handle)

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

    ROLE = "decode"

    def __init__(self, worker_id: str, handle: Any) -> None:
        super().__init__(worker_id, handle)
        self._mux: _Multiplexed | None = None  # created by the first stream, on the router's loop

    async def reserve(self, request: ReserveRequest) -> Reservation:
        return await self._call("reserve", request)

    async def recompute(self, request_id: str) -> bool:
        return await self._call("recompute", request_id)

    async def stream(self, request_id: str) -> AsyncIterator[TokenChunk]:
        mux = self._mux
        if mux is None or mux.error is not None:  # first stream, or the last one's worker connection broke
            mux = self._mux = _Multiplexed(self._worker_id, self._handle)
        queue = mux.open(request_id)
        try:
            await self._call("attach", mux.subscriber_id, request_id)
            while True:
                item = await queue.get()
                if isinstance(item, WorkerUnavailable):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            # A consumer that leaves early just stops listening; freeing KV is the job of the explicit abort.
            mux.close(request_id)


class _Multiplexed:
    """The router's end of one decode worker's `subscribe` stream: one Ray item per batch of chunks (a decode
    step's tokens for all of this router's requests there), fanned out here to each request's queue.

    One Ray streaming-generator item per token per stream cost the router ~1 ms of CPU per token; per step
    it is divided by the batch size (docs/benchmarks.md, issue 14's batching goal)."""

    def __init__(self, worker_id: str, handle: Any) -> None:
        self.subscriber_id = uuid.uuid4().hex
        self.error: WorkerUnavailable | None = None
        self._worker_id = worker_id
        self._queues: dict[str, asyncio.Queue[TokenChunk | WorkerUnavailable]] = {}
        self._gen = handle.subscribe.options(num_returns="streaming").remote(self.subscriber_id)
        self._task = asyncio.get_running_loop().create_task(self._pump())

    def open(self, request_id: str) -> asyncio.Queue[TokenChunk | WorkerUnavailable]:
        queue: asyncio.Queue[TokenChunk | WorkerUnavailable] = asyncio.Queue()
        if self.error is not None:
            queue.put_nowait(self.error)
        self._queues[request_id] = queue
        return queue

    def close(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    async def _pump(self) -> None:
        try:
            with _ray_errors(self._worker_id, "subscribe"):
                while True:
                    try:
                        ref = await self._gen.__anext__()
                    except StopAsyncIteration:
                        break
                    batch: tuple[TokenChunk, ...] = await ref
                    for chunk in batch:
                        queue = self._queues.get(chunk.request_id)
                        if queue is not None:  # else its consumer left (it was or will be aborted)
                            queue.put_nowait(chunk)
            error = WorkerUnavailable(f"{self._worker_id} ended its token stream")
        except WorkerUnavailable as e:
            error = e
        self.error = error  # every stream waiting on this worker fails over (migration); new ones reconnect
        for queue in self._queues.values():
            queue.put_nowait(error)


class RayPrefillClient(_RayWorker, PrefillClient):
    """`RayPrefillClient(worker_id, handle)`, or `await RayPrefillClient.connect(handle)` to ask its id."""

    ROLE = "prefill"

    async def prefill(self, request: PrefillRequest) -> PrefillResult:
        return await self._call("prefill", request)
