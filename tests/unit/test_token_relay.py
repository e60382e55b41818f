"""The router's token reader (TokenRelay, the multiplexed Ray reader): order, ends, errors, interrupts, slow
readers; and the per-token overhead histogram it feeds, exported. No model, no Ray cluster."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from fakes import fake_cluster, run, serve_router
from prometheus_client import generate_latest

from contracts.sampling import FinishReason
from decode_worker.api import TokenChunk
from proto.api import pb
from router.clients import WorkerUnavailable
from router.flow_errors import DecodeLost, FlowFailure
from router.metrics import RouterMetrics
from router.token_relay import TokenRelay

pytestmark = pytest.mark.timeout(60)


def chunk(rid: str, i: int, finish: FinishReason | None = None, **kw: Any) -> TokenChunk:
    return TokenChunk(rid, (i,), str(i), finish, 3, i + 1, **kw)


def to_delta(c: TokenChunk) -> pb.GenerateResponse | None:
    if not c.token_ids:
        return None
    delta = pb.TokenDelta(token_ids=c.token_ids, text=c.text)
    return pb.GenerateResponse(request_id=c.request_id, delta=delta)




class Recorded:
    """An async-generator stream over `chunks` that then raises `then` (or waits forever if `hang`), and
    records whether it was closed."""

    def __init__(self, chunks: list[TokenChunk], then: BaseException | None = None,
                 hang: bool = False) -> None:
        self.chunks, self.then, self.hang = chunks, then, hang
        self.closed = False

    async def stream(self) -> AsyncIterator[TokenChunk]:
        try:
            for c in self.chunks:
                await asyncio.sleep(0)
                yield c
            if self.then is not None:
                raise self.then
            if self.hang:
                await asyncio.Event().wait()
        finally:
            self.closed = True


async def read_all(relay: TokenRelay, metrics: RouterMetrics | None = None) -> list[int]:
    return [i async for d in relay.deltas(to_delta, metrics or RouterMetrics()) for i in d.delta.token_ids]


def test_deltas_keep_order_and_the_finish_chunk_is_the_verdict() -> None:
    async def body() -> None:
        src = Recorded([chunk("r", i) for i in range(4)] + [chunk("r", 4, FinishReason.LENGTH)])
        relay, metrics = TokenRelay("d0", src.stream()), RouterMetrics()
        assert await read_all(relay, metrics) == [0, 1, 2, 3, 4]
        assert await relay.done == FinishReason.LENGTH
        assert src.closed
        for histogram in (metrics.token_overhead, metrics.token_write):
            count = next(s.value for s in histogram.collect()[0].samples if s.name.endswith("_count"))
            assert count == 5  # one observation per delta

    run(body())


@pytest.mark.parametrize(
    ("then", "last", "error", "message"),
    [
        (None, None, DecodeLost, "ended the stream without a finish reason"),
        (WorkerUnavailable("d0 is gone"), None, DecodeLost, "d0 is gone"),
        (None, chunk("r", 2, FinishReason.ABORT, error="kv transfer failed"), FlowFailure,
         "kv transfer failed"),
        (None, chunk("r", 2, FinishReason.ABORT, error="engine died", worker_failed=True), DecodeLost,
         "engine died"),
        (ZeroDivisionError("bug"), None, ZeroDivisionError, "bug"),
    ],
)
def test_an_error_mid_stream_relays_what_came_before_it_then_becomes_the_verdict(
    then: BaseException | None, last: TokenChunk | None, error: type[Exception], message: str
) -> None:
    async def body() -> None:
        src = Recorded([chunk("r", 0), chunk("r", 1)] + ([last] if last else []), then=then)
        relay = TokenRelay("d0", src.stream())
        assert await read_all(relay) == [0, 1] + ([2] if last else [])
        with pytest.raises(error, match=message):
            await relay.done
        assert src.closed

    run(body())


def test_interrupt_stops_a_reader_waiting_inside_the_stream_and_closes_it() -> None:
    async def body() -> None:
        src = Recorded([chunk("r", 0)], hang=True)
        relay = TokenRelay("d0", src.stream())

        async def read_then_go_on() -> tuple[list[int], int]:
            ids = await read_all(relay)
            await asyncio.sleep(0.01)  # the task lives on (reads the flow's next event): no cancel left over
            return ids, asyncio.current_task().cancelling()  # type: ignore[union-attr]

        reader = asyncio.create_task(read_then_go_on())
        await asyncio.sleep(0.05)  # the reader has the first delta and waits inside the stream
        relay.interrupt()  # the flow ended the attempt: abort, client gone, deadline, prefill failure
        assert await asyncio.wait_for(reader, 1.0) == ([0], 0)
        assert src.closed and not relay.done.done()

    run(body())


def test_interrupt_before_the_reader_starts_closes_the_stream_unread() -> None:
    async def body() -> None:
        src = Recorded([chunk("r", 0, FinishReason.LENGTH)])
        stream = src.stream()
        relay = TokenRelay("d0", stream)
        relay.interrupt()
        assert await read_all(relay) == []
        assert stream.ag_frame is None  # closed before it ever ran

    run(body())


@pytest.mark.parametrize("interrupted_too", [False, True])
def test_cancelling_the_reader_task_propagates_and_closes_the_stream(interrupted_too: bool) -> None:
    async def body() -> None:
        src = Recorded([], hang=True)
        relay = TokenRelay("d0", src.stream())
        reader = asyncio.create_task(read_all(relay))
        await asyncio.sleep(0.02)
        reader.cancel()  # the client went away: its RPC task is cancelled, not interrupted
        if interrupted_too:
            relay.interrupt()  # and the flow ended in the same loop turn: the cancel is still not swallowed
        with pytest.raises(asyncio.CancelledError):
            await reader
        assert src.closed

    run(body())


def test_a_slow_reader_loses_nothing_from_the_multiplexed_worker_stream() -> None:
    """RayDecodeClient's reader fans a decode worker's batches out to per-request queues; the handler reads
    its queue directly. Two requests, interleaved batches, one reader much slower than the worker."""
    pytest.importorskip("ray")
    from router.ray_clients import RayDecodeClient

    async def body() -> None:
        steps = [tuple(chunk(rid, i, FinishReason.LENGTH if i == 9 else None) for rid in ("a", "b"))
                 for i in range(10)]
        handle = FakeSubscribeHandle(steps)
        client = RayDecodeClient("d0", handle)

        async def read(rid: str, delay_s: float) -> list[int]:
            relay, out = TokenRelay("d0", client.stream(rid)), []
            async for d in relay.deltas(to_delta, RouterMetrics()):
                out.extend(d.delta.token_ids)
                await asyncio.sleep(delay_s)  # the gRPC write of a slow client
            assert await relay.done == FinishReason.LENGTH
            return out

        fast, slow = await asyncio.gather(read("a", 0.0), read("b", 0.01))
        assert fast == slow == list(range(10))
        assert handle.attached == ["a", "b"]

    run(body())


def test_the_multiplexed_stream_failing_fails_its_readers_over() -> None:
    pytest.importorskip("ray")
    from router.ray_clients import RayDecodeClient

    async def body() -> None:
        handle = FakeSubscribeHandle([(chunk("a", 0),)], then=StopAsyncIteration())
        relay = TokenRelay("d0", RayDecodeClient("d0", handle).stream("a"))
        assert await read_all(relay) == [0]
        with pytest.raises(DecodeLost, match="ended its token stream"):
            await relay.done

    run(body())


class FakeSubscribeHandle:
    """The parts of a decode worker actor handle that RayDecodeClient.stream uses: `attach` and a streaming
    `subscribe` whose items arrive once every request in the batches is attached."""

    def __init__(self, batches: list[tuple[TokenChunk, ...]], then: BaseException | None = None) -> None:
        self.batches, self.then = batches, then
        self.attached: list[str] = []
        self._ready = asyncio.Event()
        self._wanted = {c.request_id for b in batches for c in b}
        self.attach = _Method(self._attach)
        self.subscribe = self

    def options(self, **_: Any) -> FakeSubscribeHandle:
        return self

    def remote(self, subscriber_id: str) -> AsyncIterator[Any]:
        return self._items()

    async def _attach(self, subscriber_id: str, request_id: str) -> None:
        self.attached.append(request_id)
        if self._wanted <= set(self.attached):
            self._ready.set()

    async def _items(self) -> AsyncIterator[Any]:
        await self._ready.wait()
        for batch in self.batches:
            yield _ready_ref(batch)
        if self.then is not None:
            return
        await asyncio.Event().wait()


class _Method:
    def __init__(self, fn: Any) -> None:
        self._fn = fn

    def remote(self, *args: Any) -> Any:
        return self._fn(*args)


async def _ready_ref(value: Any) -> Any:
    return value


def test_the_router_exports_its_per_token_overhead_histogram() -> None:
    async def body() -> str:
        prefill, decode = fake_cluster()
        async with serve_router(prefill, decode) as h:
            req = pb.GenerateRequest(text="hi", sampling=pb.SamplingOptions(max_tokens=6))
            deltas = [r async for r in h.stub.Generate(req) if r.HasField("delta")]
            assert len(deltas) == 6
            return generate_latest(h.server.metrics.registry).decode()

    text = run(body())
    assert "pdserve_router_token_overhead_seconds_count 6.0" in text
    assert "pdserve_router_token_write_seconds_count 6.0" in text
    assert 'pdserve_router_token_overhead_seconds_bucket{le="0.001"}' in text


def test_a_client_that_cancels_mid_stream_aborts_the_request_on_its_worker() -> None:
    async def body() -> None:
        prefill, decode = fake_cluster(step_delay_s=0.01)
        async with serve_router(prefill, decode) as h:
            call = h.stub.Generate(pb.GenerateRequest(text="hi", sampling=pb.SamplingOptions(max_tokens=200)))
            for _ in range(3):
                await call.read()
            call.cancel()
            for _ in range(200):
                if decode[0].abort_calls and not h.server.active:
                    break
                await asyncio.sleep(0.01)
            assert decode[0].abort_calls and not h.server.active
            assert await call.code() == grpc.StatusCode.CANCELLED

    run(body())
