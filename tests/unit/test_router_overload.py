"""Overload: requests queue FCFS for a decode worker with room; only a full queue refuses; all is bounded."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from fakes import (
    FakeDecodeClient,
    FakePrefillClient,
    FakeTokenizer,
    fake_cluster,
    run,
    serve_router,
    wait_until,
)

from proto.api import pb
from router.flow_errors import FlowError
from router.request_flow import RequestFlow
from router.validation import validate_request

pytestmark = pytest.mark.timeout(120)


async def final_of(call: grpc.aio.UnaryStreamCall) -> pb.GenerateResponse:
    items = [r async for r in call]
    assert items[-1].WhichOneof("payload") == "final"
    return items[-1]


def test_requests_wait_for_blocks_and_are_served_in_arrival_order() -> None:
    async def body() -> None:
        decode = FakeDecodeClient(num_blocks=1, step_delay_s=0.02)  # one request at a time fits
        prefill = [FakePrefillClient(decoders=[decode])]
        async with serve_router(prefill, [decode]) as h:
            calls, sampling = [], pb.SamplingOptions(max_tokens=4)
            for i in range(4):
                req = pb.GenerateRequest(request_id=f"r{i}", text="hi", sampling=sampling)
                calls.append(h.stub.Generate(req))
                await wait_until(lambda i=i: f"r{i}" in h.server.active, what=f"r{i} to arrive")
                await wait_until(lambda i=i: h.server.admission.queue_depth == i, what=f"{i} queued")
            finals = await asyncio.gather(*(final_of(c) for c in calls))
        assert [f.final.finish_reason for f in finals] == [pb.FINISH_REASON_LENGTH] * 4
        # A refused request went back to the head of the queue: nobody overtook anybody.
        assert list(decode.requests) == ["r0", "r1", "r2", "r3"]
        assert len(decode.reserve_calls) > 4  # the waiting ones were refused at least once, not failed
        assert all(f.final.timings.queue_seconds > 0.05 for f in finals[1:])
        assert len(decode.free_blocks) == 1

    run(body(), timeout_s=30)


def test_sequence_cap_queues_instead_of_rejecting_and_the_deadline_names_it() -> None:
    async def body() -> None:
        prefill, decode = fake_cluster(step_delay_s=0.01, max_num_seqs=2)
        async with serve_router(prefill, decode, queue_capacity=16) as h:
            assert h.server.admission.capacity == 2  # the worker's slots, not a router constant
            reqs = [
                pb.GenerateRequest(text=f"p{i}", sampling=pb.SamplingOptions(max_tokens=5)) for i in range(6)
            ]
            finals = await asyncio.gather(*(final_of(h.stub.Generate(r)) for r in reqs))
            assert all(f.final.finish_reason == pb.FINISH_REASON_LENGTH for f in finals)

            slow = pb.SamplingOptions(max_tokens=200)
            held = [h.stub.Generate(pb.GenerateRequest(text=f"h{i}", sampling=slow)) for i in range(2)]
            for call in held:
                await call.read()
            # The server's own deadline, not a client's, so the server's message is what we read.
            late = validate_request(pb.GenerateRequest(text="late"), FakeTokenizer(), h.server.limits)
            events = [e async for e in h.server.open_flow(late, 0.3, api="grpc").events()]
            for call in held:
                call.cancel()
        assert isinstance(events[-1], FlowError) and events[-1].code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "in-flight slots (the decode workers' max_num_seqs): 2 of 2 taken" in events[-1].message

    run(body(), timeout_s=30)


def test_in_flight_bound_follows_the_ready_decode_workers_slots() -> None:
    async def body() -> None:
        d0 = FakeDecodeClient("decode-0", max_num_seqs=3)
        d1 = FakeDecodeClient("decode-1", max_num_seqs=5)
        prefill = [FakePrefillClient(decoders=[d0, d1])]
        async with serve_router(prefill, [d0, d1]) as h:
            assert h.server.admission.capacity == 8
            d1.state = "failed"
            await wait_until(lambda: h.server.admission.capacity == 3, what="capacity to shrink")
        async with serve_router(prefill, [d0, d1], max_inflight=2) as h:
            d1.state = "ready"
            await wait_until(lambda: h.server.pool.decode_slots() == 8, what="both ready")
            assert h.server.admission.capacity == 2  # a configured max_inflight still caps it

    run(body())


def test_two_thousand_requests_at_a_slow_worker_stay_bounded_and_all_end_clearly() -> None:
    queue_capacity, slots = 32, 4

    async def body() -> None:
        prefill, decode = fake_cluster(step_delay_s=0.002, max_num_seqs=slots, num_blocks=slots)
        async with serve_router(prefill, decode, queue_capacity=queue_capacity) as h:
            server, adm = h.server, h.server.admission
            peak = {"depth": 0, "inflight": 0, "active": 0}

            async def watch() -> None:
                while True:
                    peak["depth"] = max(peak["depth"], adm.queue_depth)
                    peak["inflight"] = max(peak["inflight"], adm.inflight)
                    peak["active"] = max(peak["active"], len(server.active))
                    await asyncio.sleep(0.001)

            async def consume(flow: RequestFlow) -> str:
                async for event in flow.events():
                    if isinstance(event, FlowError):
                        return event.code.name
                    if event.WhichOneof("payload") == "final":
                        return "OK"
                raise AssertionError("a flow ended without a terminal event")

            watcher = asyncio.create_task(watch())
            tokenizer, consumers = FakeTokenizer(), []
            for i in range(2000):  # arrivals far above what one slow worker drains: a sustained overload
                req = pb.GenerateRequest(text="hello", sampling=pb.SamplingOptions(max_tokens=3))
                budget = 0.05 if i % 3 == 0 else 30.0  # some would rather give up than wait long
                flow = server.open_flow(validate_request(req, tokenizer, server.limits), budget, api="grpc")
                consumers.append(asyncio.create_task(consume(flow)))
                if i % 20 == 19:
                    await asyncio.sleep(0.002)
            outcomes = await asyncio.gather(*consumers)
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            await wait_until(lambda: not server.active and adm.inflight == 0, what="everything to finish")
            metrics = server.metrics

        counts = {o: outcomes.count(o) for o in set(outcomes)}
        assert set(counts) <= {"OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}, counts
        assert counts.get("OK", 0) > 0 and counts.get("RESOURCE_EXHAUSTED", 0) > 0, counts
        # Bounded: a requeued request may sit at the head beyond the capacity, never more than the slots.
        assert peak["depth"] <= queue_capacity + slots, peak
        assert peak["inflight"] <= slots, peak
        assert peak["active"] <= queue_capacity + slots + 20, peak  # + one arrival wave not yet run
        assert adm.queue_depth == 0 and len(decode[0].free_blocks) == slots
        rejected = metrics.rejected
        assert rejected.labels(reason="queue_full")._value.get() == counts["RESOURCE_EXHAUSTED"]
        assert rejected.labels(reason="deadline")._value.get() <= counts.get("DEADLINE_EXCEEDED", 0)
        waits = {s.name: s.value for s in metrics.queue_wait.collect()[0].samples}
        assert waits["pdserve_queue_wait_seconds_count"] >= counts["OK"]

    run(body(), timeout_s=110)
