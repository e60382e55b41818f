"""Router request endings other than success: Abort, client cancel, deadlines, queue full, prefill failure."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from fakes import RouterHarness, fake_cluster, run, serve_router, wait_until

from proto.api import pb

pytestmark = pytest.mark.timeout(60)

LONG = pb.SamplingOptions(max_tokens=200)  # with step_delay_s this outlives every test unless ended early


def long_request(rid: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id=rid, text="hello", sampling=LONG)


async def read_rest(call: grpc.aio.UnaryStreamCall) -> list[pb.GenerateResponse]:
    """Drain with read(): a call read once with read() cannot switch to `async for`."""
    out = []
    while (item := await call.read()) is not grpc.aio.EOF:
        out.append(item)
    return out


async def assert_no_leftovers(h: RouterHarness) -> None:
    await wait_until(lambda: not h.server.active and not h.server._flow_tasks, what="request tasks to finish")
    assert h.server.admission.inflight == 0 and h.server.admission.queue_depth == 0


def test_abort_rpc_ends_the_stream_with_abort_and_aborts_both_workers_once() -> None:
    async def body() -> None:
        prefill, decode = fake_cluster(step_delay_s=0.02)
        async with serve_router(prefill, decode) as h:
            call = h.stub.Generate(long_request("r-abort"))
            first = await call.read()
            assert first.delta.token_ids
            assert (await h.stub.Abort(pb.AbortRequest(request_id="r-abort"))).found
            # Abort answers after the workers were told.
            assert decode[0].abort_calls == ["r-abort"] and prefill[0].abort_calls == ["r-abort"]
            rest = await read_rest(call)
            assert await call.code() == grpc.StatusCode.OK
            assert rest[-1].final.finish_reason == pb.FINISH_REASON_ABORT
            assert rest[-1].final.usage.completion_tokens == 1 + len(rest) - 1
            assert not (await h.stub.Abort(pb.AbortRequest(request_id="r-abort"))).found
            await assert_no_leftovers(h)
        assert decode[0].abort_calls == ["r-abort"] and prefill[0].abort_calls == ["r-abort"]
        assert len(decode[0].free_blocks) == decode[0].num_total_blocks

    run(body())


def test_client_cancel_aborts_on_both_workers_exactly_once() -> None:
    async def body() -> None:
        prefill, decode = fake_cluster(step_delay_s=0.02)
        async with serve_router(prefill, decode) as h:
            call = h.stub.Generate(long_request("r-cancel"))
            await call.read()
            call.cancel()
            await wait_until(lambda: decode[0].abort_calls and prefill[0].abort_calls, what="aborts")
            await assert_no_leftovers(h)
            await asyncio.sleep(0.1)  # nothing fires a second time later
        assert decode[0].abort_calls == ["r-cancel"] and prefill[0].abort_calls == ["r-cancel"]
        assert len(decode[0].free_blocks) == decode[0].num_total_blocks

    run(body())


def test_client_cancel_during_prefill_aborts_the_prefill_too() -> None:
    async def body() -> None:
        prefill, decode = fake_cluster()
        prefill[0].hang = True
        async with serve_router(prefill, decode) as h:
            call = h.stub.Generate(long_request("r-early"))
            await wait_until(lambda: prefill[0].prefill_calls, what="prefill to start")
            call.cancel()
            await wait_until(lambda: decode[0].abort_calls and prefill[0].abort_calls, what="aborts")
            await assert_no_leftovers(h)
        assert decode[0].abort_calls == ["r-early"] and prefill[0].abort_calls == ["r-early"]

    run(body())


def test_router_timeout_gives_deadline_exceeded_and_aborts_both_workers() -> None:
    async def body() -> grpc.aio.AioRpcError:
        prefill, decode = fake_cluster(step_delay_s=10.0)
        async with serve_router(prefill, decode, request_timeout_s=0.3) as h:
            call = h.stub.Generate(long_request("r-slow"))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                [r async for r in call]
            # The status is sent after cleanup, so the aborts already happened.
            assert decode[0].abort_calls == ["r-slow"] and prefill[0].abort_calls == ["r-slow"]
            await assert_no_leftovers(h)
        return info.value

    err = run(body())
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "r-slow" in err.details() and "0.3s" in err.details()


def test_client_deadline_bounds_the_request_and_aborts_both_workers() -> None:
    async def body() -> None:
        prefill, decode = fake_cluster(step_delay_s=10.0)
        async with serve_router(prefill, decode) as h:
            call = h.stub.Generate(long_request("r-client-deadline"), timeout=0.3)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                [r async for r in call]
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await wait_until(lambda: decode[0].abort_calls and prefill[0].abort_calls, what="aborts")
            await assert_no_leftovers(h)
        assert decode[0].abort_calls == ["r-client-deadline"] and prefill[0].abort_calls == [
            "r-client-deadline"
        ]

    run(body())


def test_a_client_deadline_is_counted_as_deadline_whichever_side_notices_it_first() -> None:
    """The router's timer and gRPC's cancellation fire at the same instant: either way the outcome is the
    deadline (it was counted "cancelled", as a client hanging up is, when gRPC's cancellation came first)."""
    async def body() -> dict[str, float]:
        prefill, decode = fake_cluster(step_delay_s=10.0)
        async with serve_router(prefill, decode) as h:
            for i in range(6):
                call = h.stub.Generate(long_request(f"r-deadline-{i}"), timeout=0.3)
                await asyncio.sleep(0.1 + 0.03 * i)
                time.sleep(0.3)  # a busy loop (a loaded router): both ends of the deadline come due at once
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    [r async for r in call]
                assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await assert_no_leftovers(h)
            counter = h.server.metrics.requests
            return {o: counter.labels(outcome=o, api="grpc")._value.get() for o in ("deadline", "cancelled")}

    assert run(body(), timeout_s=20) == {"deadline": 6, "cancelled": 0}


def test_queue_full_is_resource_exhausted_with_the_waiting_count_and_a_retry_hint() -> None:
    async def body() -> None:
        prefill, decode = fake_cluster(step_delay_s=10.0)
        async with serve_router(prefill, decode, max_inflight=1, queue_capacity=2) as h:
            running = h.stub.Generate(long_request("q0"))
            await running.read()
            queued = [h.stub.Generate(long_request(f"q{i}")) for i in (1, 2)]
            await wait_until(lambda: h.server.admission.queue_depth == 2, what="two queued")
            info = await h.stub.GetServerInfo(pb.GetServerInfoRequest())
            assert info.queue_depth == 2
            with pytest.raises(grpc.aio.AioRpcError) as err:
                [r async for r in h.stub.Generate(long_request("q3"))]
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert err.value.details() == "queue full (2 waiting); retry after 1s"
            assert ("retry-after-ms", "1000") in tuple(err.value.trailing_metadata())
            # A queued request that is cancelled never touches a worker.
            queued[0].cancel()
            await wait_until(lambda: h.server.admission.queue_depth == 1, what="queue to shrink")
            assert [r.request_id for r in decode[0].reserve_calls] == ["q0"]
            for call in (running, queued[1]):
                call.cancel()
            await assert_no_leftovers(h)

    run(body())


def test_prefill_failure_is_unavailable_with_the_reason_and_decode_is_aborted() -> None:
    async def body() -> grpc.aio.AioRpcError:
        prefill, decode = fake_cluster()
        prefill[0].fail_with = "KV send to decode-0 timed out"
        # "fail": end with the reason (the default, "recompute", is tested in test_router_healing.py)
        async with serve_router(prefill, decode, kv_failure_policy="fail") as h:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                [r async for r in h.stub.Generate(long_request("r-fail"))]
            assert decode[0].abort_calls == ["r-fail"]
            assert prefill[0].abort_calls == []  # PrefillFailed means the prefill side already cleaned up
            assert len(decode[0].free_blocks) == decode[0].num_total_blocks
            await assert_no_leftovers(h)
        return info.value

    err = run(body())
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert err.details() == "prefill failed on prefill-0: KV send to decode-0 timed out"


def test_decode_worker_failing_the_request_is_unavailable_with_its_error() -> None:
    async def body() -> grpc.aio.AioRpcError:
        prefill, decode = fake_cluster(fail_with="KV checksum mismatch on layer 3")
        async with serve_router(prefill, decode) as h:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await read_rest(h.stub.Generate(long_request("r-bad-kv")))
            assert decode[0].abort_calls == ["r-bad-kv"] and prefill[0].abort_calls == ["r-bad-kv"]
            await assert_no_leftovers(h)
        return info.value

    err = run(body())
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert err.details() == "decode worker decode-0 failed the request: KV checksum mismatch on layer 3"


def test_server_stop_aborts_requests_still_running() -> None:
    async def body() -> None:
        prefill, decode = fake_cluster(step_delay_s=10.0)
        async with serve_router(prefill, decode) as h:
            call = h.stub.Generate(long_request("r-shutdown"))
            await call.read()
            await h.server.stop(grace=0.05)
            with pytest.raises(grpc.aio.AioRpcError):
                await read_rest(call)
            assert not h.server._flow_tasks
        assert decode[0].abort_calls == ["r-shutdown"] and prefill[0].abort_calls == ["r-shutdown"]

    run(body())
