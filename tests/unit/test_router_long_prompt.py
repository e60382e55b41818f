"""A prompt of megabytes is tokenized off the router's event loop: other requests' streams keep flowing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable

import grpc
import pytest
from fakes import FAKE_MODEL, FakeTokenizer, fake_cluster, run, serve_http

from engine.model_files import resolve_model_path
from engine.tokenizer import Tokenizer
from proto.api import pb
from router.validation import OFF_LOOP_PROMPT_CHARS

pytestmark = pytest.mark.timeout(60)

TOKENIZE_S = 0.5
LONG = "x" * OFF_LOOP_PROMPT_CHARS


class SlowTokenizer(FakeTokenizer):
    """Takes as long over a long text as the real tokenizer over megabytes, GIL released as it does."""

    def encode(self, text: str) -> list[int]:
        if len(text) >= OFF_LOOP_PROMPT_CHARS:
            time.sleep(TOKENIZE_S)
        return super().encode(text)


async def _ticks_while(call: Awaitable[object]) -> int:
    """How often a 10 ms timer fired on this (the router's) event loop while `call` ran."""
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        await call
    finally:
        ticker.cancel()
    return ticks


def test_both_doors_tokenize_a_long_prompt_while_the_loop_keeps_running() -> None:
    async def scenario() -> tuple[int, int]:
        prefill, decode = fake_cluster()
        async with serve_http(prefill, decode) as (h, client):
            h.server.tokenizer = SlowTokenizer()

            async def grpc_call() -> None:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    async for _ in h.stub.Generate(pb.GenerateRequest(text=LONG)):
                        pass
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # past the fake's 256 tokens

            async def http_call() -> None:
                body = {"model": FAKE_MODEL.model_name, "prompt": LONG}
                r = await client.post("/v1/completions", json=body)
                assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"

            return await _ticks_while(grpc_call()), await _ticks_while(http_call())

    # Inline, the loop stood still for the whole tokenization (a tick or two); off the loop it ticks on.
    for ticks in run(scenario()):
        assert ticks >= TOKENIZE_S / 0.01 / 3, ticks


def test_the_real_tokenizer_releases_the_gil_while_it_encodes() -> None:
    tokenizer = Tokenizer.from_model(resolve_model_path(None))
    text = "hello world " * 100_000  # ~0.7 s on this box
    assert tokenizer.encode("hello world") == tokenizer._backend.encode("hello world").ids

    async def body() -> tuple[int, float]:
        start = time.perf_counter()
        ticks = await _ticks_while(asyncio.to_thread(tokenizer.encode, text))
        return ticks, time.perf_counter() - start

    ticks, took = run(body())
    assert ticks >= took / 0.01 / 3, (ticks, took)  # with encode() holding the GIL: a tick or two
