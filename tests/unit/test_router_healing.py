"""Requests survive dead workers: migration off a dead decode worker, the KV failure policy for prefill."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from fakes import BYTE_OFFSET, FakeDecodeClient, fake_cluster, output_token, run, serve_router, wait_until

from contracts.sampling import FinishReason
from decode_worker.api import TokenChunk
from proto.api import pb

pytestmark = pytest.mark.timeout(60)

MAX_TOKENS = 12
UNDISTURBED_IDS = [output_token(i) for i in range(MAX_TOKENS)]
UNDISTURBED_TEXT = "".join(chr(t - BYTE_OFFSET) for t in UNDISTURBED_IDS)


def request(rid: str) -> pb.GenerateRequest:
    sampling = pb.SamplingOptions(max_tokens=MAX_TOKENS)
    return pb.GenerateRequest(request_id=rid, text="hello", sampling=sampling)


async def collect(call: grpc.aio.UnaryStreamCall) -> tuple[list[int], str, pb.FinalResult]:
    ids, text, final = [], "", None
    async for response in call:
        if response.HasField("delta"):
            ids += response.delta.token_ids
            text += response.delta.text
        else:
            final = response.final
    assert final is not None
    return ids, text, final


def migrations(h) -> float:
    return h.server.metrics.registry.get_sample_value("pdserve_request_migrations_total") or 0.0


def test_stream_continues_on_another_decode_worker_without_a_lost_or_repeated_token() -> None:
    async def body() -> None:
        prefill, decode = fake_cluster(num_decode=2)
        decode[0].die_after = 5
        decode[1].state = "starting"  # not ready yet: the request starts on decode-0
        async with serve_router(prefill, decode) as h:
            await wait_until(lambda: len(h.server.pool.ready("decode")) == 1, what="decode-0 alone ready")
            decode[1].state = "ready"
            call = h.stub.Generate(request("r-move"))
            await wait_until(lambda: len(h.server.pool.ready("decode")) == 2, what="both ready")
            ids, text, final = await collect(call)
            assert (ids, text) == (UNDISTURBED_IDS, UNDISTURBED_TEXT)
            assert final.finish_reason == pb.FINISH_REASON_LENGTH
            assert final.usage.completion_tokens == MAX_TOKENS
            assert final.timings.decode_worker == "decode-1"
            moved = decode[1].reserve_calls[-1]
            assert moved.num_resumed_tokens == 5 and moved.sampling.max_tokens == MAX_TOKENS - 5
            assert moved.prompt_token_ids[-5:] == tuple(UNDISTURBED_IDS[:5])
            assert prefill[0].prefill_calls[-1].prompt_token_ids == moved.prompt_token_ids
            assert migrations(h) == 1
            assert len(decode[1].free_blocks) == decode[1].num_total_blocks

    run(body())


def test_the_only_decode_worker_restarts_and_the_stream_continues_there() -> None:
    async def body() -> None:
        prefill, decode = fake_cluster(num_decode=1)
        decode[0].die_after = 3

        async def restart_later() -> None:  # what Ray does for a killed actor
            await wait_until(lambda: decode[0].dead, what="decode-0 to die")
            await asyncio.sleep(0.3)
            decode[0].restart()

        async with serve_router(prefill, decode) as h:
            restarter = asyncio.create_task(restart_later())
            ids, text, final = await collect(h.stub.Generate(request("r-back")))
            await restarter
            assert (ids, text) == (UNDISTURBED_IDS, UNDISTURBED_TEXT)
            assert final.finish_reason == pb.FINISH_REASON_LENGTH
            assert decode[0].reserve_calls[-1].num_resumed_tokens == 3
            assert migrations(h) == 1

    run(body())


def test_a_second_death_beyond_the_migration_limit_is_unavailable() -> None:
    async def body() -> None:
        prefill, decode = fake_cluster(num_decode=1)
        decode[0].die_after = 2
        async with serve_router(prefill, decode, migration_limit=0) as h:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await collect(h.stub.Generate(request("r-gone")))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "migration limit 0 reached" in info.value.details()
            await wait_until(lambda: not h.server.active, what="flow to end")

    run(body())


def test_failed_prefill_is_recomputed_on_the_decode_worker() -> None:
    async def body() -> None:
        prefill, decode = fake_cluster()
        prefill[0].fail_with = "KV send to decode-0 timed out"
        async with serve_router(prefill, decode) as h:  # kv_failure_policy defaults to recompute
            ids, text, final = await collect(h.stub.Generate(request("r-recompute")))
            assert (ids, text) == (UNDISTURBED_IDS, UNDISTURBED_TEXT)
            assert decode[0].recompute_calls == ["r-recompute"]
            assert final.timings.prefill_worker == "local"
            assert len(decode[0].free_blocks) == decode[0].num_total_blocks

    run(body())


def test_no_ready_prefill_worker_prefills_on_the_decode_worker_unless_policy_is_fail() -> None:
    async def body(policy: str) -> pb.FinalResult | grpc.aio.AioRpcError:
        prefill, decode = fake_cluster()
        prefill[0].state = "starting"  # e.g. restarting after a kill
        async with serve_router(prefill, decode, kv_failure_policy=policy) as h:
            await wait_until(lambda: h.server.pool.ready("decode"), what="decode ready")
            try:
                ids, _, final = await collect(h.stub.Generate(request(f"r-{policy}")))
            except grpc.aio.AioRpcError as e:
                return e
            assert ids == UNDISTURBED_IDS and decode[0].reserve_calls[-1].prefill_locally
            return final

    final = run(body("recompute"))
    assert isinstance(final, pb.FinalResult) and final.timings.prefill_worker == "local"
    err = run(body("fail"))
    assert isinstance(err, grpc.aio.AioRpcError) and err.code() == grpc.StatusCode.UNAVAILABLE


class _EngineDies(FakeDecodeClient):
    """decode-0's engine thread dies after 4 tokens: the process answers, the stream ends worker_failed."""

    async def stream(self, request_id: str) -> AsyncIterator[TokenChunk]:
        async for chunk in super().stream(request_id):
            yield chunk
            if chunk.num_output_tokens == 4 and self.worker_id == "decode-0":
                self.state = "failed"
                yield TokenChunk(request_id, (), "", FinishReason.ABORT, 0, 4, "engine thread died",
                                 worker_failed=True)
                return


def test_a_worker_whose_engine_died_is_migrated_off_too() -> None:
    async def body() -> None:
        decode = [_EngineDies("decode-0"), _EngineDies("decode-1", state="starting")]
        prefill, _ = fake_cluster()
        prefill[0].decoders = {d.worker_id: d for d in decode}
        async with serve_router(prefill, decode) as h:
            await wait_until(lambda: len(h.server.pool.ready("decode")) == 1, what="decode-0 alone ready")
            decode[1].state = "ready"
            call = h.stub.Generate(request("r-engine"))
            ids, text, final = await collect(call)
            assert (ids, text) == (UNDISTURBED_IDS, UNDISTURBED_TEXT)
            assert final.timings.decode_worker == "decode-1"
            assert migrations(h) == 1

    run(body())


def test_a_new_request_waits_for_the_only_decode_worker_to_come_back() -> None:
    """Sent while the only decode worker restarts (Ray brings it back), a request is served when it is ready
    again, not failed at once; past decode_ready_wait_s it is UNAVAILABLE, naming the wait."""
    async def body() -> None:
        prefill, decode = fake_cluster()
        decode[0].state = "failed"
        async with serve_router(prefill, decode, decode_ready_wait_s=10.0) as h:
            await wait_until(lambda: not h.server.pool.ready("decode"), what="decode-0 seen down")
            call = asyncio.ensure_future(collect(h.stub.Generate(request("r-wait"))))
            await asyncio.sleep(0.3)
            assert not call.done()
            decode[0].state = "ready"
            ids, _, final = await asyncio.wait_for(call, 5)
            assert ids == UNDISTURBED_IDS and final.finish_reason == pb.FINISH_REASON_LENGTH
        decode[0].state = "failed"
        async with serve_router(prefill, decode, decode_ready_wait_s=0.3) as h:
            await wait_until(lambda: not h.server.pool.ready("decode"), what="decode-0 seen down")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await collect(h.stub.Generate(request("r-gone")))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "no decode worker is ready (waited 0.3 s for one)" in info.value.details()

    run(body())
