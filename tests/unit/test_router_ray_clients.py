"""Ray clients against toy actors: results, streaming, typed errors (NoCapacity, PrefillFailed), dead actors.

Starts a local Ray (~6 s), hence marked e2e; the actors are toys, no model is loaded."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from fakes import run

from contracts.sampling import FinishReason, SamplingParams
from contracts.stats import EngineStats, WorkerInfo
from contracts.transfer import TransferTarget
from decode_worker.api import NoCapacity, Reservation, ReserveRequest, TokenChunk
from prefill_worker.api import PrefillFailed, PrefillRequest, PrefillResult
from router.clients import WorkerUnavailable

ray = pytest.importorskip("ray")
from router.ray_clients import RayDecodeClient, RayPrefillClient  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def toy_actors() -> tuple[Any, Any]:
    """Defined in a function so Ray ships the classes by value (this module is not on the workers' path)."""

    @ray.remote(num_cpus=0)
    class ToyDecode:
        async def info(self) -> WorkerInfo:
            return WorkerInfo("toy-decode", "decode", "ready", EngineStats(7, 8, 1, 0, 0))

        async def reserve(self, req: ReserveRequest) -> Reservation:
            if len(req.prompt_token_ids) > 4:
                raise NoCapacity("only 4 tokens fit")
            return Reservation(req.request_id, "toy-decode", (3, 5))

        def __init__(self) -> None:
            self.attached: list[str] = []
            self.both = asyncio.Event()

        async def attach(self, subscriber_id: str, request_id: str) -> None:
            self.attached.append(request_id)
            if len(self.attached) == 2:
                self.both.set()

        async def subscribe(self, subscriber_id: str):  # type: ignore[no-untyped-def]
            # As a decode step does: one item carries a token for every attached request.
            await self.both.wait()
            for i in range(3):
                yield tuple(TokenChunk(rid, (i,), str(i), FinishReason.LENGTH if i == 2 else None)
                            for rid in self.attached)
            await asyncio.Event().wait()  # the worker's stream stays open for later requests

        async def abort(self, request_id: str) -> bool:
            return request_id == "known"

        async def metrics_text(self) -> str:
            return "# TYPE pdserve_spec_draft_tokens_total counter\npdserve_spec_draft_tokens_total 2\n"

    @ray.remote(num_cpus=0)
    class ToyPrefill:
        async def info(self) -> WorkerInfo:
            return WorkerInfo("toy-prefill", "prefill", "ready", EngineStats(8, 8, 0, 0, 0))

        async def prefill(self, req: PrefillRequest) -> PrefillResult:
            if req.request_id == "bad":
                raise PrefillFailed("send failed")
            if req.request_id == "bug":
                raise ZeroDivisionError("bug in worker")
            return PrefillResult(req.request_id, 42, 0.0, 0.5, 0.0)

        async def abort(self, request_id: str) -> bool:
            return False

        async def metrics_text(self) -> str:
            return ""

    return ToyDecode.remote(), ToyPrefill.remote()


@pytest.fixture(scope="module")
def actors() -> Iterator[tuple[Any, Any]]:
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        yield toy_actors()
    finally:
        ray.shutdown()


def test_ray_clients_relay_results_streams_and_typed_errors(actors: tuple[Any, Any]) -> None:
    decode_handle, prefill_handle = actors
    sampling = SamplingParams(max_tokens=3)

    async def body() -> None:
        decode = await RayDecodeClient.connect(decode_handle)
        prefill = await RayPrefillClient.connect(prefill_handle)
        assert (decode.worker_id, prefill.worker_id) == ("toy-decode", "toy-prefill")
        assert (await decode.info()).stats.num_free_blocks == 7
        reservation = await decode.reserve(ReserveRequest("r1", (1, 2), sampling))
        assert reservation.block_ids == (3, 5)
        with pytest.raises(NoCapacity, match="only 4 tokens fit"):
            await decode.reserve(ReserveRequest("r2", (1,) * 9, sampling))
        async def collect(rid: str) -> list[TokenChunk]:
            return [c async for c in decode.stream(rid)]

        # Two requests' tokens arrive in shared items and are fanned out to each request's own stream.
        for rid, chunks in zip(("r1", "r3"), await asyncio.gather(collect("r1"), collect("r3")), strict=True):
            assert [c.token_ids for c in chunks] == [(0,), (1,), (2,)]
            assert {c.request_id for c in chunks} == {rid}
            assert chunks[-1].finish_reason is FinishReason.LENGTH
        assert await decode.abort("known") and not await decode.abort("other")
        assert "pdserve_spec_draft_tokens_total 2" in await decode.metrics_text()

        target = TransferTarget("r1", "toy-decode", (3, 5), 2)
        result = await prefill.prefill(PrefillRequest("r1", (1, 2), sampling, target))
        assert (result.first_token_id, result.prefill_seconds) == (42, 0.5)
        with pytest.raises(PrefillFailed, match="send failed"):
            await prefill.prefill(PrefillRequest("bad", (1, 2), sampling, target))
        with pytest.raises(WorkerUnavailable, match="ZeroDivisionError: bug in worker"):
            await prefill.prefill(PrefillRequest("bug", (1, 2), sampling, target))

        ray.kill(prefill_handle)
        assert (await dead_within(prefill, seconds=20)).startswith("toy-prefill is gone (")

        # The decode worker dies with a request streaming: its stream fails (the router migrates it).
        waiting = asyncio.ensure_future(collect("r4"))
        await asyncio.sleep(0.5)
        ray.kill(decode_handle)
        with pytest.raises(WorkerUnavailable, match="toy-decode"):
            await asyncio.wait_for(waiting, 20)

    run(body(), timeout_s=60)


async def dead_within(client: RayPrefillClient, seconds: float) -> str:
    """ray.kill is asynchronous: a call sent right after it may still be served. Poll (bounded) until the
    client reports the actor gone, and return that message; fail if it keeps answering."""
    deadline = asyncio.get_running_loop().time() + seconds
    while asyncio.get_running_loop().time() < deadline:
        try:
            await client.info()
        except WorkerUnavailable as e:
            return str(e)
        await asyncio.sleep(0.1)
    pytest.fail(f"actor still answers {seconds} s after ray.kill")
