"""Worker liveness is a heartbeat: a slow info() or a busy worker is not a failure; silence or an error is."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from fakes import FakeDecodeClient, FakePrefillClient, run, serve_router, wait_until

from proto.api import pb
from router.clients import WorkerUnavailable
from router.workers import WorkerPool

pytestmark = pytest.mark.timeout(60)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_slow_answers_keep_a_worker_ready_until_heartbeats_stop_for_the_timeout() -> None:
    async def body() -> None:
        clock, decode = Clock(), FakeDecodeClient()
        pool = WorkerPool([], [decode], call_timeout_s=0.05, heartbeat_timeout_s=10.0, clock=clock)
        await pool.refresh()
        assert [i.state for i in pool.infos()] == ["ready"]
        decode.info_delay_s = 1.0  # answers later than the call timeout
        clock.now += 9.0
        await pool.refresh_one("decode-0")
        assert pool.infos()[0].state == "ready"  # silent for 9 s of 10: still alive
        clock.now += 2.0
        await pool.refresh_one("decode-0")
        assert pool.infos()[0].state == "failed"
        decode.info_delay_s = 0.0
        await pool.refresh_one("decode-0")  # it answers again: back to ready
        assert pool.infos()[0].state == "ready"

    run(body())


def test_a_worker_whose_call_errors_is_failed_at_once() -> None:
    class Gone(FakeDecodeClient):
        async def info(self):  # type: ignore[override]
            raise WorkerUnavailable("decode-0 is gone (RayActorError)")

    async def body() -> None:
        pool = WorkerPool([], [Gone()], heartbeat_timeout_s=1000.0)
        await pool.refresh()
        assert [i.state for i in pool.infos()] == ["failed"]

    run(body())


def test_busy_prefill_worker_with_a_slow_control_plane_is_not_failed_and_others_keep_serving() -> None:
    async def body() -> None:
        decode = FakeDecodeClient(num_blocks=256)
        busy = FakePrefillClient("prefill-0", decoders=[decode], hang=True)
        idle = FakePrefillClient("prefill-1", decoders=[decode])
        async with serve_router(
            [busy, idle], [decode], worker_call_timeout_s=0.1, worker_heartbeat_timeout_s=30.0
        ) as h:
            long = h.stub.Generate(pb.GenerateRequest(request_id="long", text="x" * 100))
            await wait_until(lambda: busy.prefill_calls, what="the long prompt to reach prefill-0")
            busy.info_delay_s = 2.0  # a long step: its info() would now miss every call timeout
            await asyncio.sleep(0.5)  # several refresh rounds time out meanwhile
            for i in range(5):
                items = [r async for r in h.stub.Generate(pb.GenerateRequest(text=f"short {i}"))]
                assert items[-1].final.timings.prefill_worker == "prefill-1"
            info = await h.stub.GetServerInfo(pb.GetServerInfoRequest())
            assert {w.worker_id: w.state for w in info.workers}["prefill-0"] == "ready"
            assert h.server.pool.serving
            long.cancel()
            with pytest.raises(asyncio.CancelledError):
                await long.read()
        assert len(busy.prefill_calls) == 1

    run(body(), timeout_s=30)


def test_server_info_counts_follow_a_reservation_within_the_refresh_interval() -> None:
    async def body() -> None:
        decode = FakeDecodeClient(num_blocks=64, step_delay_s=10.0)
        prefill = FakePrefillClient(decoders=[decode])
        async with serve_router([prefill], [decode], worker_refresh_s=0.1) as h:
            sampling = pb.SamplingOptions(max_tokens=9)
            call = h.stub.Generate(pb.GenerateRequest(text="x" * 40, sampling=sampling))
            await call.read()
            decode.free_blocks.extend(range(100, 110))  # the worker's own count changes behind the router
            await asyncio.sleep(0.25)
            info = await h.stub.GetServerInfo(pb.GetServerInfoRequest())
            status = {w.worker_id: w for w in info.workers}["decode-0"]
            assert status.free_kv_blocks == 64 - 3 + 10
            call.cancel()
            with pytest.raises((asyncio.CancelledError, grpc.aio.AioRpcError)):
                await call.read()

    run(body())
