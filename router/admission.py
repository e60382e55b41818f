"""Bounded admission: at most max_inflight requests dispatched, at most queue_capacity waiting (FIFO)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator


class QueueFull(RuntimeError):
    """Every in-flight slot is taken and the wait queue is at capacity (becomes RESOURCE_EXHAUSTED)."""

    def __init__(self, waiting: int) -> None:
        super().__init__(f"queue full ({waiting} waiting)")
        self.waiting = waiting


class Admission:
    def __init__(self, max_inflight: int, queue_capacity: int) -> None:
        if max_inflight < 1 or queue_capacity < 0:
            raise ValueError(
                f"need max_inflight >= 1 and queue_capacity >= 0, got {max_inflight}, {queue_capacity}"
            )
        self.max_inflight = max_inflight
        self.queue_capacity = queue_capacity
        self._inflight = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def queue_depth(self) -> int:
        return sum(1 for f in self._waiters if not f.done())

    async def acquire(self) -> None:
        """Take an in-flight slot, waiting in FIFO order; raises QueueFull at once when the queue is full."""
        if self._inflight < self.max_inflight and not self._waiters:
            self._inflight += 1
            return
        depth = self.queue_depth
        if depth >= self.queue_capacity:
            raise QueueFull(depth)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was handed to us just as we were cancelled: pass it on
            else:
                fut.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            raise

    def release(self) -> None:
        """Give the slot to the oldest live waiter (the in-flight count stays), or free it."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self._inflight -= 1

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self.acquire()
        try:
            yield
        finally:
            self.release()
