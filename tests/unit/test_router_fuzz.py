"""Fuzz the public gRPC API (structured requests and raw bytes): never UNKNOWN/INTERNAL, never a leak.

A few hundred requests run in `make test`; `make fuzz` runs the soak-scale variant (marker `fuzz`)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from fakes import FakeDecodeClient, fake_cluster, serve_router
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proto.api import SERVICE_NAME, pb

pytestmark = pytest.mark.timeout(900)

NEVER = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
METHODS = ("Generate", "Abort", "GetModelInfo", "GetServerInfo")
INT32 = st.integers(-(2**31), 2**31 - 1)
SMALL_OR_EDGE = st.one_of(st.integers(-2, 8), st.sampled_from([-(2**31), 2**31 - 1, 255, 256, 258, 259]))
FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from([0.0, 1.0, -0.0])
)
TEXT = st.text(max_size=40)


@dataclass
class LiveRouter:
    address: str
    decode: list[FakeDecodeClient]


@pytest.fixture(scope="module")
def live_router() -> Iterator[LiveRouter]:
    """One router with fake workers on its own thread and loop, so hypothesis drives it with a sync client."""
    ready, box = threading.Event(), {}

    async def serve() -> None:
        prefill, decode = fake_cluster()
        # max_tokens defaults small: the fuzz is about input handling, not about streaming long outputs.
        async with serve_router(prefill, decode, default_max_tokens=4, max_request_bytes=64 * 1024) as h:
            stop = asyncio.Event()
            box.update(
                router=LiveRouter(h.server.address, decode), loop=asyncio.get_running_loop(), stop=stop
            )
            ready.set()
            await stop.wait()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(10), "router did not start"
    yield box["router"]
    box["loop"].call_soon_threadsafe(box["stop"].set)
    thread.join(10)


@pytest.fixture(scope="module")
def channel(live_router: LiveRouter) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(live_router.address) as ch:
        yield ch


def _sampling() -> st.SearchStrategy[pb.SamplingOptions]:
    return st.builds(
        lambda mt, t, p, k, seed, stop, ids, eos, present: pb.SamplingOptions(
            stop=stop,
            stop_token_ids=ids,
            ignore_eos=eos,
            **{
                name: value
                for name, value in (
                    ("max_tokens", mt),
                    ("temperature", t),
                    ("top_p", p),
                    ("top_k", k),
                    ("seed", seed),
                )
                if name in present
            },
        ),
        SMALL_OR_EDGE,
        FLOATS,
        FLOATS,
        SMALL_OR_EDGE,
        st.integers(0, 2**64 - 1),
        st.lists(TEXT, max_size=40),
        st.lists(INT32, max_size=300),
        st.booleans(),
        st.sets(st.sampled_from(["max_tokens", "temperature", "top_p", "top_k", "seed"])),
    )


def _generate_request() -> st.SearchStrategy[pb.GenerateRequest]:
    chat = st.lists(
        st.builds(
            pb.ChatMessage, role=st.sampled_from(["system", "user", "assistant", "", "tool"]), content=TEXT
        ),
        max_size=4,
    )
    inputs = st.one_of(
        st.builds(dict, text=TEXT),
        st.builds(
            lambda ids: {"token_ids": pb.TokenIds(ids=ids)}, st.lists(SMALL_OR_EDGE | INT32, max_size=20)
        ),
        st.builds(lambda messages: {"chat": pb.ChatMessages(messages=messages)}, chat),
        st.just({}),
    )
    return st.builds(
        lambda rid, given_input, sampling: pb.GenerateRequest(
            request_id=rid, sampling=sampling, **given_input
        ),
        st.one_of(st.just(""), st.text(max_size=140)),
        inputs,
        _sampling(),
    )


def _raw_request() -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, and valid requests cut short or with bytes flipped (closer to what parses)."""

    def mutate(data: bytes, cut: int, flips: list[tuple[int, int]]) -> bytes:
        out = bytearray(data[: max(0, len(data) - cut)])
        for pos, value in flips:
            if out:
                out[pos % len(out)] = value
        return bytes(out)

    valid = _generate_request().map(lambda r: r.SerializeToString())
    return st.one_of(
        st.binary(max_size=200),
        st.builds(
            mutate, valid, st.integers(0, 8), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)))
        ),
    )


def _call(channel: grpc.Channel, method: str, data: bytes) -> tuple[grpc.StatusCode, str]:
    path = f"/{SERVICE_NAME}/{method}"
    try:
        if method == "Generate":
            stream = channel.unary_stream(path)(data, timeout=10)
            items = [pb.GenerateResponse.FromString(item) for item in stream]
            assert items and items[-1].HasField("final"), "an OK stream ends with one final message"
        else:
            channel.unary_unary(path)(data, timeout=10)
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


def _no_leaked_blocks(router: LiveRouter) -> None:
    deadline = time.monotonic() + 5
    while any(len(d.free_blocks) != d.num_total_blocks for d in router.decode):
        assert time.monotonic() < deadline, "KV blocks leaked on the fake decode worker"
        time.sleep(0.01)


def _fuzz(channel: grpc.Channel, router: LiveRouter, examples: int, derandomize: bool) -> None:
    common = settings(
        max_examples=examples,
        deadline=None,
        database=None,  # nothing written into the checkout
        derandomize=derandomize,
        suppress_health_check=list(HealthCheck),
    )

    seen: Counter[str] = Counter()

    def check(code: grpc.StatusCode, details: str) -> None:
        seen[code.name] += 1
        assert code not in NEVER, f"{code.name}: {details}"
        assert code == grpc.StatusCode.OK or details, f"{code.name} without a message"

    @common
    @given(_generate_request())
    def structured(request: pb.GenerateRequest) -> None:
        check(*_call(channel, "Generate", request.SerializeToString()))

    @common
    @given(st.sampled_from(METHODS), _raw_request())
    def raw(method: str, data: bytes) -> None:
        check(*_call(channel, method, data))

    structured()
    raw()
    print(f"fuzz outcomes: {dict(seen)}")
    # Both the happy path and the rejections were reached, or the fuzz proved little.
    assert seen["OK"] and seen["INVALID_ARGUMENT"], seen
    _no_leaked_blocks(router)
    assert _call(channel, "GetServerInfo", b"")[0] == grpc.StatusCode.OK  # still serving


def test_fuzzed_requests_never_get_unknown_or_internal(
    channel: grpc.Channel, live_router: LiveRouter
) -> None:
    _fuzz(channel, live_router, examples=150, derandomize=True)  # x2 kinds: 300 requests, reproducible


@pytest.mark.fuzz
def test_fuzz_soak_ten_thousand_requests(channel: grpc.Channel, live_router: LiveRouter) -> None:
    _fuzz(channel, live_router, examples=5000, derandomize=False)  # x2 kinds: 10,000 requests
