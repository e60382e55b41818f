"""Bad bytes, oversize messages, abusive fields: INVALID_ARGUMENT or RESOURCE_EXHAUSTED with a message."""

from __future__ import annotations

import grpc
import pytest
from fakes import fake_cluster, run, serve_router

from proto.api import SERVICE_NAME, pb

pytestmark = pytest.mark.timeout(60)

GENERATE = f"/{SERVICE_NAME}/Generate"
ABORT = f"/{SERVICE_NAME}/Abort"


def _raw(data: bytes) -> bytes:
    return data


async def _raw_generate(channel: grpc.aio.Channel, data: bytes) -> grpc.aio.AioRpcError:
    call = channel.unary_stream(GENERATE, request_serializer=_raw, response_deserializer=_raw)(data)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            pass
    return info.value


def _with_invalid_utf8(field_number: int, wire_value: bytes) -> bytes:
    # Tag (field << 3 | length-delimited), a one-byte length, then the raw bytes.
    return bytes([field_number << 3 | 2, len(wire_value)]) + wire_value


def test_malformed_bytes_and_invalid_utf8_are_invalid_argument_with_a_message() -> None:
    async def body() -> list[grpc.aio.AioRpcError]:
        prefill, decode = fake_cluster()
        async with serve_router(prefill, decode) as h:
            errors = [
                await _raw_generate(h.channel, b"\xff\xff\xff"),  # a truncated varint tag
                await _raw_generate(h.channel, b"\x12\x05ab"),  # text field shorter than its length
                await _raw_generate(h.channel, _with_invalid_utf8(2, b"\xc3\x28")),  # text: bad UTF-8
            ]
            abort = h.channel.unary_unary(ABORT, request_serializer=_raw, response_deserializer=_raw)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await abort(_with_invalid_utf8(1, b"\xff"))
            errors.append(info.value)
            # The server is fine afterwards.
            ok = [r async for r in h.stub.Generate(pb.GenerateRequest(text="hi"))]
            assert ok[-1].HasField("final")
        return errors

    for e in run(body()):
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
        assert "not a valid pdserve.v1." in e.details()


def test_a_request_over_the_size_limit_is_resource_exhausted() -> None:
    async def body() -> grpc.aio.AioRpcError:
        prefill, decode = fake_cluster()
        async with serve_router(prefill, decode, max_request_bytes=1024) as h:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in h.stub.Generate(pb.GenerateRequest(text="x" * 2000)):
                    pass
            return info.value

    e = run(body())
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in e.details()


@pytest.mark.parametrize(
    ("sampling", "field"),
    [
        (pb.SamplingOptions(stop=["s"] * 33), "sampling.stop:"),
        (pb.SamplingOptions(stop=["s" * 257]), "sampling.stop[0]:"),
        (pb.SamplingOptions(stop_token_ids=[5] * 257), "sampling.stop_token_ids:"),
        (pb.SamplingOptions(stop_token_ids=[-1]), "sampling.stop_token_ids[0]:"),
    ],
)
def test_huge_stop_lists_and_out_of_range_ids_name_the_field(
    sampling: pb.SamplingOptions, field: str
) -> None:
    async def body() -> grpc.aio.AioRpcError:
        prefill, decode = fake_cluster()
        async with serve_router(prefill, decode) as h:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in h.stub.Generate(pb.GenerateRequest(text="hi", sampling=sampling)):
                    pass
            return info.value

    e = run(body())
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details().startswith(field), e.details()


def test_token_ids_outside_the_vocabulary_are_invalid_argument() -> None:
    async def body() -> grpc.aio.AioRpcError:
        prefill, decode = fake_cluster()
        async with serve_router(prefill, decode) as h:
            request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 2**31 - 1]))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in h.stub.Generate(request):
                    pass
            return info.value

    e = run(body())
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details().startswith("token_ids[1]: 2147483647 is outside the vocabulary")
