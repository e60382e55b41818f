"""Bounded FCFS admission: requests wait until a decode worker has room; only a full queue refuses."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass


class QueueFull(RuntimeError):
    """The wait queue is at capacity (becomes RESOURCE_EXHAUSTED with a retry hint)."""

    def __init__(self, waiting: int, retry_after_s: float) -> None:
        super().__init__(f"queue full ({waiting} waiting); retry after {retry_after_s:g}s")
        self.waiting = waiting
        self.retry_after_s = retry_after_s


@dataclass(eq=False)
class _Waiter:
    future: asyncio.Future[None]
    # The room generation this waiter must see before it is let through again: a request that every worker
    # just refused waits for a release or a fresh worker report instead of spinning on reserve calls.
    min_generation: int = 0


class Admission:
    """At most `capacity` requests hold an in-flight slot (None = no bound: workers' NoCapacity is the only
    limit); the rest wait first come, first served, at most `queue_capacity` of them.

    The capacity follows the decode workers' reported sequence slots (`set_capacity`, after each refresh),
    capped by the configured `max_inflight`. A request whose reservation every worker refuses calls
    `requeue()`: it gives its slot back and waits at the head of the queue until room may have changed
    (`release()` by another request, or `room_changed()` after a worker report). The head blocks those behind
    it, so a long prompt is not overtaken forever by short ones.
    """

    def __init__(
        self, queue_capacity: int, max_inflight: int | None = None, retry_after_s: float = 1.0
    ) -> None:
        if queue_capacity < 0 or (max_inflight is not None and max_inflight < 1):
            raise ValueError(
                f"need queue_capacity >= 0 and max_inflight >= 1 or None, got {queue_capacity}, "
                f"{max_inflight}"
            )
        self.queue_capacity = queue_capacity
        self.max_inflight = max_inflight
        self.retry_after_s = retry_after_s
        self._worker_capacity: int | None = None
        self._inflight = 0
        self._depth = 0  # live waiters; an int, so a scrape thread reads it safely
        self._generation = 0
        self._waiters: collections.deque[_Waiter] = collections.deque()

    # -- state ----------------------------------------------------------------------------------------------
    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def queue_depth(self) -> int:
        return self._depth

    @property
    def capacity(self) -> int | None:
        """The in-flight bound now: min(max_inflight, the workers' reported slots); None = unbounded."""
        bounds = [b for b in (self.max_inflight, self._worker_capacity) if b is not None]
        return min(bounds) if bounds else None

    def set_capacity(self, worker_slots: int | None) -> None:
        """The decode workers' total sequence slots (None = no cap reported); lets waiters in if it grew."""
        if worker_slots != self._worker_capacity:
            self._worker_capacity = worker_slots
            self._dispatch()

    def room_changed(self) -> None:
        """A worker report may show freed blocks or slots: the blocked head tries again."""
        self._generation += 1
        self._dispatch()

    # -- a request's calls -----------------------------------------------------------------------------------
    async def acquire(self) -> None:
        """Take an in-flight slot in arrival order; raises QueueFull at once when the queue is full."""
        if not self._waiters and self._has_slot():
            self._inflight += 1
            return
        if self._depth >= self.queue_capacity:
            raise QueueFull(self._depth, self.retry_after_s)
        await self._wait(_Waiter(asyncio.get_running_loop().create_future()), at_head=False)

    async def requeue(self) -> None:
        """Every worker refused this slot's request: give the slot back and wait at the head of the queue
        until room may have changed. It counts in the depth but is never refused: it was admitted already."""
        self._inflight -= 1
        waiter = _Waiter(asyncio.get_running_loop().create_future(), min_generation=self._generation + 1)
        await self._wait(waiter, at_head=True)

    def release(self) -> None:
        """The request left the workers: its slot goes to the next waiter (or is freed)."""
        self._inflight -= 1
        self._generation += 1  # its blocks and slot are back: a blocked head may fit now
        self._dispatch()

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self.acquire()
        try:
            yield
        finally:
            self.release()

    # -- internals -------------------------------------------------------------------------------------------
    def _has_slot(self) -> bool:
        cap = self.capacity
        return cap is None or self._inflight < cap

    async def _wait(self, waiter: _Waiter, at_head: bool) -> None:
        if at_head:
            self._waiters.appendleft(waiter)
        else:
            self._waiters.append(waiter)
        self._depth += 1
        self._dispatch()
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release()  # the slot was handed to us just as we were cancelled: pass it on
            else:
                waiter.future.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
                    self._depth -= 1
                self._dispatch()  # a blocked head that leaves unblocks those behind it
            raise

    def _dispatch(self) -> None:
        """Hand free slots to waiters in order; stops at a head that waits for room to change (FCFS)."""
        while self._waiters and self._has_slot():
            head = self._waiters[0]
            if head.future.done():  # cancelled; its task removes nothing twice (remove() tolerates it)
                self._waiters.popleft()
                self._depth -= 1
                continue
            if head.min_generation > self._generation:
                return
            self._waiters.popleft()
            self._depth -= 1
            self._inflight += 1
            head.future.set_result(None)
