"""TokenRelay: one decode attempt's token stream, handed from a request's flow task to the task writing it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from contracts.sampling import FinishReason
from decode_worker.api import TokenChunk
from proto.api import pb
from router.clients import WorkerUnavailable
from router.flow_errors import DecodeLost, FlowFailure
from router.metrics import RouterMetrics

# The flow's handling of one chunk: the delta for the client, or None when the chunk carries none.
ChunkToDelta = Callable[[TokenChunk], "pb.GenerateResponse | None"]


class TokenRelay:
    """One decode attempt's token stream, read by the RPC handler's own task (`RequestFlow.events`), not by a
    task of the flow: a token then goes worker stream -> handler -> gRPC write with no task hop in between
    (the hop cost 1.4-3.1 ms p50 per token under 32-stream bursts, docs/benchmarks.md).

    The flow task keeps the control: it awaits `done` (the reader's verdict: the finish reason, or the error
    that ends the attempt) and calls `interrupt()` when the attempt ends for its own reasons (abort, client
    gone, deadline, prefill failure), which stops the reader even while it waits inside the stream. The
    reader owns the stream: it alone reads and closes it."""

    def __init__(self, worker_id: str, stream: AsyncIterator[TokenChunk]) -> None:
        self.worker_id = worker_id
        self.done: asyncio.Future[FinishReason] = asyncio.get_running_loop().create_future()
        self._stream = stream
        self._reader: asyncio.Task[Any] | None = None  # the task reading, while it waits inside the stream
        self._cancelling = 0  # the reader task's pending cancel requests when it began waiting
        self._cancelled = False  # interrupt() cancelled the reader's wait
        self._interrupted = False
        self._closed = False

    # -- the flow task's side --------------------------------------------------------------------------------
    def interrupt(self) -> None:
        """The attempt is over for the flow: the reader stops at once (a chunk in flight is dropped, as the
        cancelled relay task used to drop it). Harmless after the verdict: the reader has stopped reading."""
        if self._interrupted:
            return
        self._interrupted = True
        if self.done.done() and not self.done.cancelled():
            self.done.exception()  # a verdict that lost the race with the flow's own end is no news
        if self._reader is not None:  # it waits inside the stream: cancel that wait (and only that: below)
            self._cancelled = True
            self._reader.cancel()

    # -- the reader's side -----------------------------------------------------------------------------------
    async def deltas(self, convert: ChunkToDelta,
                     metrics: RouterMetrics) -> AsyncIterator[pb.GenerateResponse]:
        """The reader's loop: the attempt's deltas until its finish chunk, an error (handed to the flow task
        as the verdict) or an interrupt. Times each delta from its chunk's arrival here to its message handed
        to the writer (`token_overhead`: the router's own share of a token's trip), and from there to the
        writer's return (`token_write`: the gRPC write or SSE frame, the transport's share and a slow
        client's)."""
        worker_id, overhead, write = self.worker_id, metrics.token_overhead, metrics.token_write
        try:
            while (chunk := await self._next_chunk()) is not None:
                arrived = time.perf_counter()
                delta = convert(chunk)
                if delta is not None:
                    handed = time.perf_counter()
                    overhead.observe(handed - arrived)
                    yield delta
                    write.observe(time.perf_counter() - handed)
                if chunk.worker_failed:
                    raise DecodeLost(worker_id, f"decode worker {worker_id} failed: {chunk.error}")
                if chunk.error:  # the worker gave up on the request (e.g. KV transfer failed): not an abort
                    raise FlowFailure(grpc.StatusCode.UNAVAILABLE,
                                      f"decode worker {worker_id} failed the request: {chunk.error}",
                                      "worker_failed")
                if chunk.finish_reason is not None:
                    self._give_verdict(chunk.finish_reason)
                    return
        except StopAsyncIteration:
            ended = f"decode worker {worker_id} ended the stream without a finish reason"
            self._give_verdict(DecodeLost(worker_id, ended))
        except WorkerUnavailable as e:
            self._give_verdict(DecodeLost(worker_id, str(e)))
        except Exception as e:  # DecodeLost, FlowFailure, or a bug: the flow task decides what follows
            self._give_verdict(e)
        finally:
            await self._close()

    async def _next_chunk(self) -> TokenChunk | None:
        """The stream's next chunk; None once the flow interrupted the attempt. Stream errors propagate.

        A cancel scope as asyncio.timeout keeps one (the same uncancel accounting: a cancellation of the
        reader's task from elsewhere, e.g. client gone, still propagates), minus its per-entry cost (~10 µs a
        chunk on a 2-core box): the scope is armed only by an interrupt."""
        if self._interrupted or self.done.done():
            return None
        task = self._reader = asyncio.current_task()
        assert task is not None  # called from a coroutine: there is always a task
        self._cancelling = task.cancelling()
        try:
            chunk = await anext(self._stream)
        except asyncio.CancelledError:
            # Ours (and no one else's) only if interrupt() cancelled and the count is back to before it.
            if not self._cancelled or task.uncancel() > self._cancelling:
                raise
            return None
        finally:
            self._reader = None
        if self._cancelled:  # the stream swallowed our cancel and went on: take it back, stop anyway
            task.uncancel()
            return None
        return chunk

    def _give_verdict(self, verdict: FinishReason | Exception) -> None:
        if self._interrupted or self.done.done():  # the flow moved on (its wait was cancelled)
            return
        if isinstance(verdict, Exception):
            self.done.set_exception(verdict)
        else:
            self.done.set_result(verdict)

    async def _close(self) -> None:
        """Close the stream now (stops a remote generator, unregisters from a multiplexed reader), once."""
        if self._closed:
            return
        self._closed = True
        aclose = getattr(self._stream, "aclose", None)
        if aclose is not None:
            await aclose()
