"""Router on real grpc.aio with fake workers: streaming, concurrency, dispatch, health, reflection, info."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from fakes import (
    BYTE_OFFSET,
    FAKE_MODEL,
    FakeDecodeClient,
    FakePrefillClient,
    FakeTokenizer,
    fake_cluster,
    output_token,
    run,
    serve_router,
    wait_until,
)
from google.protobuf.descriptor_pb2 import FileDescriptorProto
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from proto.api import SERVICE_NAME, pb

pytestmark = pytest.mark.timeout(60)


async def collect(call: grpc.aio.UnaryStreamCall) -> tuple[list[pb.GenerateResponse], pb.GenerateResponse]:
    items = [r async for r in call]
    deltas, finals = items[:-1], items[-1:]
    assert all(r.WhichOneof("payload") == "delta" for r in deltas)
    assert finals and finals[0].WhichOneof("payload") == "final"
    return deltas, finals[0]


def test_generate_streams_token_deltas_then_one_final_message() -> None:
    async def body() -> None:
        prefill, decode = fake_cluster()
        async with serve_router(prefill, decode) as h:
            call = h.stub.Generate(
                pb.GenerateRequest(
                    request_id="req-1", text="hello", sampling=pb.SamplingOptions(max_tokens=5)
                )
            )
            deltas, final = await collect(call)
            assert await call.code() == grpc.StatusCode.OK
        assert [r.request_id for r in deltas + [final]] == ["req-1"] * 6
        assert [tuple(d.delta.token_ids) for d in deltas] == [(output_token(i),) for i in range(5)]
        assert "".join(d.delta.text for d in deltas) == "abcde"
        f = final.final
        assert f.finish_reason == pb.FINISH_REASON_LENGTH
        assert (f.usage.prompt_tokens, f.usage.completion_tokens) == (5, 5)
        t = f.timings
        assert (t.prefill_worker, t.decode_worker) == ("prefill-0", "decode-0")
        assert 0 <= t.queue_seconds <= t.ttft_seconds <= t.e2e_seconds
        # What the workers were asked: the reservation's blocks are exactly where prefill sends the KV.
        (reserve,) = decode[0].reserve_calls
        (pre,) = prefill[0].prefill_calls
        assert reserve.prompt_token_ids == tuple(FakeTokenizer().encode("hello")) == pre.prompt_token_ids
        assert not reserve.prefill_locally
        assert pre.target.decode_id == "decode-0" and pre.target.num_tokens == 5
        assert pre.target.block_ids == decode[0].requests["req-1"].block_ids and pre.target.block_ids
        assert not decode[0].abort_calls and not prefill[0].abort_calls  # normal finish aborts nothing
        assert len(decode[0].free_blocks) == decode[0].num_total_blocks

    run(body())


def test_stop_token_ends_the_stream_with_finish_reason_stop() -> None:
    async def body() -> pb.GenerateResponse:
        prefill, decode = fake_cluster()
        async with serve_router(prefill, decode) as h:
            opts = pb.SamplingOptions(max_tokens=20, stop_token_ids=[output_token(2)])
            deltas, final = await collect(h.stub.Generate(pb.GenerateRequest(text="hi", sampling=opts)))
        assert len(deltas) == 3
        return final

    final = run(body())
    assert final.final.finish_reason == pb.FINISH_REASON_STOP
    assert final.final.usage.completion_tokens == 3


def test_eight_concurrent_clients_each_get_their_own_complete_stream() -> None:
    async def body() -> None:
        prefill, decode = fake_cluster(num_prefill=2, num_decode=2, step_delay_s=0.002)
        for p in prefill:
            p.delay_s = 0.02  # prefills overlap, so a busy worker must be passed over
        async with serve_router(prefill, decode, max_inflight=8) as h:

            async def one(i: int) -> tuple[list[pb.GenerateResponse], pb.GenerateResponse]:
                req = pb.GenerateRequest(
                    request_id=f"c{i}",
                    token_ids=pb.TokenIds(ids=[10 + i] * (i + 1)),
                    sampling=pb.SamplingOptions(max_tokens=4 + i),
                )
                return await collect(h.stub.Generate(req))

            results = await asyncio.gather(*(one(i) for i in range(8)))
            assert not h.server.active
        for i, (deltas, final) in enumerate(results):
            assert {d.request_id for d in deltas} | {final.request_id} == {f"c{i}"}
            assert len(deltas) == 4 + i
            assert final.final.finish_reason == pb.FINISH_REASON_LENGTH
            assert (final.final.usage.prompt_tokens, final.final.usage.completion_tokens) == (i + 1, 4 + i)
        # Load spreads over both workers of each role even though the snapshots refresh only every 50 ms.
        assert all(d.reserve_calls for d in decode) and all(p.prefill_calls for p in prefill)
        assert sum(len(d.reserve_calls) for d in decode) == 8
        assert all(len(d.free_blocks) == d.num_total_blocks for d in decode)

    run(body())


def test_full_decode_worker_is_skipped_and_a_prompt_nobody_has_room_for_waits_for_its_deadline() -> None:
    async def body() -> None:
        full, roomy = FakeDecodeClient("decode-0", num_blocks=0), FakeDecodeClient("decode-1", num_blocks=1)
        prefill = [FakePrefillClient(decoders=[full, roomy])]
        async with serve_router(
            prefill, [full, roomy], dispatch_policy="round_robin", request_timeout_s=0.5
        ) as h:
            _, final = await collect(h.stub.Generate(pb.GenerateRequest(text="hi")))
            assert final.final.timings.decode_worker == "decode-1"
            assert len(full.reserve_calls) == 1 and not full.abort_calls
            with pytest.raises(grpc.aio.AioRpcError) as info:  # 17 tokens need 2 blocks: nobody has them
                await collect(h.stub.Generate(pb.GenerateRequest(text="x" * 17)))
            assert h.server.metrics.rejected.labels(reason="deadline")._value.get() == 1
        # Queued, not refused: the deadline ends it, and the message names the limit each worker hit.
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        details = info.value.details()
        assert "waiting for a decode worker with room" in details
        assert "decode-0: 2 KV blocks needed, 0 free" in details
        assert "decode-1: 2 KV blocks needed, 1 free" in details

    run(body())


def test_short_prompt_is_prefilled_locally_on_the_decode_worker() -> None:
    async def body() -> None:
        prefill, decode = fake_cluster()
        config = {"prefill_placement": "threshold", "local_prefill_max_tokens": 8}
        async with serve_router(prefill, decode, **config) as h:
            _, short = await collect(h.stub.Generate(pb.GenerateRequest(text="hi")))
            _, long = await collect(h.stub.Generate(pb.GenerateRequest(text="a much longer prompt")))
            placed = h.server.metrics.registry.get_sample_value
            for where, reason in (("local", "under_threshold"), ("remote", "over_threshold")):
                assert placed("pdserve_prefill_placement_total", {"where": where, "reason": reason}) == 1
        assert short.final.timings.prefill_worker == "local"
        assert long.final.timings.prefill_worker == "prefill-0"
        assert [r.prefill_locally for r in decode[0].reserve_calls] == [True, False]
        assert len(prefill[0].prefill_calls) == 1

    run(body())


def test_health_is_not_serving_until_a_prefill_and_a_decode_worker_are_ready() -> None:
    async def body() -> None:
        prefill, decode = fake_cluster()
        prefill[0].state = decode[0].state = "starting"
        async with serve_router(prefill, decode, decode_ready_wait_s=0.2) as h:
            health = health_pb2_grpc.HealthStub(h.channel)

            async def status(service: str) -> int:
                return (await health.Check(health_pb2.HealthCheckRequest(service=service))).status

            NOT_SERVING, SERVING = (
                health_pb2.HealthCheckResponse.NOT_SERVING,
                health_pb2.HealthCheckResponse.SERVING,
            )
            assert await status("") == NOT_SERVING and await status(SERVICE_NAME) == NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await collect(h.stub.Generate(pb.GenerateRequest(text="hi")))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            prefill[0].state = "ready"
            await asyncio.sleep(0.2)  # several refresh rounds
            assert await status("") == NOT_SERVING
            decode[0].state = "ready"
            statuses: list[int] = []

            async def serving() -> None:
                while not statuses or statuses[-1] != SERVING:
                    statuses.append(await status(""))
                    await asyncio.sleep(0.02)

            await asyncio.wait_for(serving(), 2)
            assert await status(SERVICE_NAME) == SERVING
            _, final = await collect(h.stub.Generate(pb.GenerateRequest(text="hi")))
            assert final.final.finish_reason == pb.FINISH_REASON_LENGTH

    run(body())


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_v1_and_v1alpha_list_services_and_describe_themselves(version: str) -> None:
    """grpcurl asks v1 first, older clients v1alpha; both answer, and each can describe its own service."""
    service = f"grpc.reflection.{version}.ServerReflection"

    async def body() -> tuple[list[str], FileDescriptorProto]:
        prefill, decode = fake_cluster()
        async with serve_router(prefill, decode) as h:
            # v1's messages are v1alpha's byte for byte, so one set of classes speaks to both paths.
            info = h.channel.stream_stream(
                f"/{service}/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )
            call = info(
                iter(
                    [
                        reflection_pb2.ServerReflectionRequest(list_services=""),
                        reflection_pb2.ServerReflectionRequest(file_containing_symbol=service),
                    ]
                )
            )
            listed, described = await call.read(), await call.read()
            call.cancel()
        files = described.file_descriptor_response.file_descriptor_proto
        return [s.name for s in listed.list_services_response.service], FileDescriptorProto.FromString(
            files[0]
        )

    names, file = run(body())
    assert {"pdserve.v1.PDServe", "grpc.health.v1.Health", service} <= set(names)
    assert file.package == f"grpc.reflection.{version}"
    assert [m.name for m in file.service[0].method] == ["ServerReflectionInfo"]


def test_model_info_and_server_info_report_model_workers_and_queue() -> None:
    async def body() -> tuple[pb.ModelInfo, pb.ServerInfo]:
        prefill, decode = fake_cluster(num_decode=2)
        async with serve_router(prefill, decode, queue_capacity=7, served_model_name="byte-model") as h:
            return (
                await h.stub.GetModelInfo(pb.GetModelInfoRequest()),
                await h.stub.GetServerInfo(pb.GetServerInfoRequest()),
            )

    model, server = run(body())
    assert (model.model_name, model.context_length, model.vocab_size) == (
        "byte-model",  # the served name, as the HTTP door and `pdserve info` call it
        FAKE_MODEL.context_length,
        FAKE_MODEL.vocab_size,
    )
    assert (model.kv_cache_dtype, model.weight_dtype, model.compute_dtype, model.weights) == (
        "int8", "q4_1", "float32", "w8a8")
    assert [(w.worker_id, w.role, w.state) for w in server.workers] == [
        ("decode-0", "decode", "ready"),
        ("decode-1", "decode", "ready"),
        ("prefill-0", "prefill", "ready"),
    ]
    assert server.workers[0].total_kv_blocks == 64 and server.workers[0].free_kv_blocks == 64
    assert (server.dispatch_policy, server.queue_capacity, server.queue_depth) == ("least_loaded", 7, 0)


def test_unexpected_exception_is_internal_with_a_one_line_message() -> None:
    class BrokenTokenizer(FakeTokenizer):
        def encode(self, text: str) -> list[int]:
            raise KeyError("secret internal detail")

    async def body() -> grpc.aio.AioRpcError:
        prefill, decode = fake_cluster()
        async with serve_router(prefill, decode) as h:
            h.server.tokenizer = BrokenTokenizer()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await collect(h.stub.Generate(pb.GenerateRequest(text="hi")))
            # The server keeps serving afterwards.
            ok = await collect(h.stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[BYTE_OFFSET]))))
            assert ok[1].final.finish_reason == pb.FINISH_REASON_LENGTH
        return info.value

    err = run(body())
    assert err.code() == grpc.StatusCode.INTERNAL
    assert err.details() == "internal error (KeyError)"
    assert "Traceback" not in err.details() and "secret" not in err.details()


def test_request_id_already_in_flight_is_rejected() -> None:
    async def body() -> grpc.aio.AioRpcError:
        prefill, decode = fake_cluster(step_delay_s=0.05)
        async with serve_router(prefill, decode) as h:
            req = pb.GenerateRequest(request_id="dup", text="hi", sampling=pb.SamplingOptions(max_tokens=50))
            first = h.stub.Generate(req)
            await first.read()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await collect(h.stub.Generate(req))
            first.cancel()
            await wait_until(lambda: not h.server.active, what="first request to end")
        return info.value

    err = run(body())
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and "'dup'" in err.details()
