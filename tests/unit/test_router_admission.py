"""Admission: bounded slots, bounded FIFO queue, cancelled waiters, refused requests keep their place."""

from __future__ import annotations

import asyncio

import pytest
from fakes import run

from router.admission import Admission, QueueFull

pytestmark = pytest.mark.timeout(30)


def test_requests_beyond_inflight_wait_and_beyond_capacity_are_refused() -> None:
    async def body() -> None:
        adm = Admission(queue_capacity=1, max_inflight=2)
        await adm.acquire()
        await adm.acquire()
        waiter = asyncio.create_task(adm.acquire())
        await asyncio.sleep(0)
        assert (adm.inflight, adm.queue_depth) == (2, 1)
        with pytest.raises(QueueFull, match=r"queue full \(1 waiting\); retry after 1s"):
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
        adm = Admission(queue_capacity=5, max_inflight=1)
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
        adm = Admission(queue_capacity=1, max_inflight=1)
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
        adm = Admission(queue_capacity=2, max_inflight=1)
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


def test_refused_requests_return_to_their_place_and_only_the_head_retries() -> None:
    async def body() -> None:
        adm = Admission(queue_capacity=8)  # no slot bound: only the workers' refusals hold requests back
        t0, t1 = await adm.acquire(), await adm.acquire()
        late = asyncio.create_task(adm.acquire())
        await asyncio.sleep(0)
        assert late.done()  # no refusal yet: it is let through at once
        t2 = late.result()
        for t in (t1, t0):  # refused out of order; each goes back to where it stood
            asyncio.create_task(adm.requeue(t))
        await asyncio.sleep(0)
        assert (adm.inflight, adm.queue_depth) == (1, 2)
        newcomer = asyncio.create_task(adm.acquire())
        await asyncio.sleep(0)
        assert not newcomer.done() and adm.queue_depth == 3  # it waits behind the refused ones
        adm.room_changed()
        await asyncio.sleep(0)
        assert (adm.inflight, adm.queue_depth) == (2, 2)  # only the head (t0) tries again
        adm.placed(t0)  # t0 fits: the next one goes
        await asyncio.sleep(0)
        assert (adm.inflight, adm.queue_depth) == (3, 1)
        requeued_t1 = asyncio.create_task(adm.requeue(t1))  # t1 is refused again: the newcomer stays behind
        await asyncio.sleep(0)
        assert not newcomer.done() and adm.queue_depth == 2
        adm.release(t2)  # room came back
        await asyncio.wait_for(requeued_t1, 1)
        assert not newcomer.done()
        adm.placed(t1)
        await asyncio.wait_for(newcomer, 1)

    run(body())


def test_capacity_is_the_smaller_of_max_inflight_and_the_workers_slots() -> None:
    async def body() -> None:
        adm = Admission(queue_capacity=4, max_inflight=3)
        adm.set_capacity(1)
        assert adm.capacity == 1
        await adm.acquire()
        waiter = asyncio.create_task(adm.acquire())
        await asyncio.sleep(0)
        assert adm.queue_depth == 1
        adm.set_capacity(5)  # a worker joined: the waiter goes in without anyone leaving
        await asyncio.wait_for(waiter, 1)
        assert (adm.capacity, adm.inflight) == (3, 2)
        adm.set_capacity(None)
        assert adm.capacity == 3

    run(body())
