"""Bounded FCFS admission: requests wait until a decode worker has room; only a full queue refuses."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass


class QueueFull(RuntimeError):
    """The wait queue is at capacity (becomes RESOURCE_EXHAUSTED with a retry hint)."""

    def __init__(self, waiting: int, retry_after_s: float) -> None:
        super().__init__(f"queue full ({waiting} waiting); retry after {retry_after_s:g}s")
        self.waiting = waiting
        self.retry_after_s = retry_after_s


@dataclass(eq=False)
class Ticket:
    """One request's place in line, kept across requeues so that it goes back where it stood."""

    number: int  # arrival order
    future: asyncio.Future[None] | None = None  # set while waiting
    # The room generation it must see before it is let through again: a request that every worker just
    # refused waits for a release or a fresh worker report instead of spinning on reserve calls.
    min_generation: int = 0
    refused: bool = False


class Admission:
    """At most `capacity` requests hold an in-flight slot (None = no bound: workers' NoCapacity is the only
    limit); the rest wait first come, first served, at most `queue_capacity` of them.

    The capacity follows the decode workers' reported sequence slots (`set_capacity`, after each refresh),
    capped by the configured `max_inflight`. A request whose reservation every worker refuses calls
    `requeue()`: it gives its slot back and returns to its place at the head of the queue until room may have
    changed (`release()` by another request, or `room_changed()` after a worker report). Then only that head
    tries again; those behind it wait until it is `placed()` or refused once more, so a long prompt is not
    overtaken forever by short ones and a room change costs one reservation attempt, not one per waiter.
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
        self._tickets = itertools.count()
        self._waiters: collections.deque[Ticket] = collections.deque()
        self._retrying: Ticket | None = None  # a refused request let through again, not yet placed

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

    def describe(self) -> str:
        """The limit a waiting request is held by, for messages."""
        cap = self.capacity
        slots = "no bound" if cap is None else f"{self._inflight} of {cap} taken"
        return f"in-flight slots (the decode workers' max_num_seqs): {slots}; {self._depth} waiting"

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
    async def acquire(self) -> Ticket:
        """Take an in-flight slot in arrival order; raises QueueFull at once when the queue is full."""
        ticket = Ticket(next(self._tickets))
        if not self._waiters and self._retrying is None and self._has_slot():
            self._inflight += 1
            return ticket
        if self._depth >= self.queue_capacity:
            raise QueueFull(self._depth, self.retry_after_s)
        await self._wait(ticket)
        return ticket

    async def requeue(self, ticket: Ticket) -> None:
        """Every worker refused `ticket`'s request: give the slot back and wait at its place in line (ahead of
        all who never got a slot) until room may have changed. Never refused: it was admitted already."""
        self._inflight -= 1
        self._end_retry(ticket)
        ticket.refused = True
        ticket.min_generation = self._generation + 1
        await self._wait(ticket)

    def placed(self, ticket: Ticket) -> None:
        """`ticket`'s request got its reservation: those behind a retried head may go now."""
        self._end_retry(ticket)
        self._dispatch()

    def release(self, ticket: Ticket | None = None) -> None:
        """The request left the workers: its slot goes to the next waiter (or is freed)."""
        self._inflight -= 1
        if ticket is not None:
            self._end_retry(ticket)
        self._generation += 1  # its blocks and slot are back: a blocked head may fit now
        self._dispatch()

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        ticket = await self.acquire()
        try:
            yield
        finally:
            self.release(ticket)

    # -- internals -------------------------------------------------------------------------------------------
    def _has_slot(self) -> bool:
        cap = self.capacity
        return cap is None or self._inflight < cap

    def _end_retry(self, ticket: Ticket) -> None:
        if self._retrying is ticket:
            self._retrying = None

    async def _wait(self, ticket: Ticket) -> None:
        # Arrival order is ticket order, so a requeued ticket goes in front of everyone who came after it.
        at = next((i for i, t in enumerate(self._waiters) if t.number > ticket.number), len(self._waiters))
        self._waiters.insert(at, ticket)
        future = ticket.future = asyncio.get_running_loop().create_future()
        self._depth += 1
        self._dispatch()
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(ticket)  # the slot was handed to us just as we were cancelled: pass it on
            else:
                future.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(ticket)
                    self._depth -= 1
                self._dispatch()  # a blocked head that leaves unblocks those behind it
            raise

    def _dispatch(self) -> None:
        """Hand free slots to waiters in order; stops at a head that waits for room to change (FCFS) and
        while a refused head tries again."""
        while self._waiters and self._retrying is None and self._has_slot():
            head = self._waiters[0]
            if head.future is None or head.future.done():  # cancelled: counted out here, not by its task
                self._waiters.popleft()
                self._depth -= 1
                continue
            if head.min_generation > self._generation:
                return
            self._waiters.popleft()
            self._depth -= 1
            self._inflight += 1
            if head.refused:
                self._retrying = head
            head.future.set_result(None)
