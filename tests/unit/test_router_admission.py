"""Admission: bounded in-flight slots, bounded FIFO queue, cancellation while waiting."""

from __future__ import annotations

import asyncio

import pytest
from fakes import run

from router.admission import Admission, QueueFull

pytestmark = pytest.mark.timeout(30)


def test_requests_beyond_inflight_wait_and_beyond_capacity_are_refused() -> None:
    async def body() -> None:
        adm = Admission(max_inflight=2, queue_capacity=1)
        await adm.acquire()
        await adm.acquire()
        waiter = asyncio.create_task(adm.acquire())
        await asyncio.sleep(0)
        assert (adm.inflight, adm.queue_depth) == (2, 1)
        with pytest.raises(QueueFull, match=r"queue full \(1 waiting\)"):
            await adm.acquire()
        adm.release()  # slot handed to the waiter, in-flight count unchanged
        await asyncio.wait_for(waiter, 1)
        assert (adm.inflight, adm.queue_depth) == (2, 0)
        adm.release()
        adm.release()
        assert adm.inflight == 0

    run(body())


def test_waiters_are_served_in_arrival_order() -> None:
    async def body() -> list[int]:
        adm = Admission(max_inflight=1, queue_capacity=5)
        order: list[int] = []
        await adm.acquire()

        async def client(i: int) -> None:
            async with adm.slot():
                order.append(i)

        tasks = [asyncio.create_task(client(i)) for i in range(4)]
        await asyncio.sleep(0)
        assert adm.queue_depth == 4
        adm.release()
        await asyncio.gather(*tasks)
        assert adm.inflight == 0
        return order

    assert run(body()) == [0, 1, 2, 3]


def test_cancelled_waiter_leaves_the_queue_without_taking_a_slot() -> None:
    async def body() -> None:
        adm = Admission(max_inflight=1, queue_capacity=1)
        await adm.acquire()
        waiter = asyncio.create_task(adm.acquire())
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert adm.queue_depth == 0
        second = asyncio.create_task(adm.acquire())  # the freed queue place is usable again
        await asyncio.sleep(0)
        adm.release()
        await asyncio.wait_for(second, 1)
        adm.release()
        assert adm.inflight == 0

    run(body())


def test_waiter_cancelled_just_after_handoff_passes_the_slot_on() -> None:
    async def body() -> None:
        adm = Admission(max_inflight=1, queue_capacity=2)
        await adm.acquire()
        first = asyncio.create_task(adm.acquire())
        second = asyncio.create_task(adm.acquire())
        await asyncio.sleep(0)
        adm.release()  # hands the slot to `first`...
        first.cancel()  # ...which is cancelled before it runs: the slot must reach `second`
        with pytest.raises(asyncio.CancelledError):
            await first
        await asyncio.wait_for(second, 1)
        assert (adm.inflight, adm.queue_depth) == (1, 0)

    run(body())
