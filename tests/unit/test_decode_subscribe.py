"""DecodeService.subscribe/attach: one batched stream for many requests (what the Ray router client reads)."""
from __future__ import annotations

import asyncio
import time

import pytest

from contracts.sampling import FinishReason, SamplingParams
from decode_worker.api import ReserveRequest, TokenChunk
from decode_worker.service import DecodeService
from engine.config import EngineConfig

pytestmark = pytest.mark.timeout(120)

CONFIG = EngineConfig(model_path="random:tiny", device="cpu", block_size=4, num_kv_blocks=32)
PROMPT = (1, 2, 3, 4, 5)


async def _until_idle(decode: DecodeService) -> None:
    while True:
        stats = (await decode.info()).stats
        if stats.num_running == stats.num_waiting == 0 and stats.num_free_blocks == CONFIG.num_kv_blocks:
            return
        await asyncio.sleep(0.01)


def test_one_subscriber_carries_every_attached_request_and_what_queued_before() -> None:
    decode = DecodeService("decode-0", CONFIG)
    sampling = SamplingParams(max_tokens=6, ignore_eos=True)
    try:
        async def scenario() -> None:
            for rid in ("a", "b"):
                await decode.reserve(ReserveRequest(rid, PROMPT, sampling, prefill_locally=True))
            await _until_idle(decode)  # both finished before anyone listened: their chunks wait
            for rid in ("a", "b"):
                decode.attach("router-0", rid)
            with pytest.raises(KeyError):
                decode.attach("router-0", "a")  # already attached
            batches = decode.subscribe("router-0")
            first = await anext(batches)
            # Everything that arrived since the last item is one item: all of both streams here.
            by_request: dict[str, list[TokenChunk]] = {"a": [], "b": []}
            for chunk in first:
                by_request[chunk.request_id].append(chunk)
            for chunks in by_request.values():
                assert sum(len(c.token_ids) for c in chunks) == sampling.max_tokens
                assert chunks[-1].finish_reason is FinishReason.LENGTH
                assert chunks[-1].num_output_tokens == sampling.max_tokens
            await batches.aclose()
            assert not decode._streams  # finished requests leave the subscriber and the worker

        asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        decode.shutdown()


def test_a_subscriber_that_goes_away_aborts_its_unfinished_requests() -> None:
    decode = DecodeService("decode-0", CONFIG)
    sampling = SamplingParams(max_tokens=80, ignore_eos=True)
    try:
        execute, aborted = decode.engine.execute, []

        def slow_execute(out):  # type: ignore[no-untyped-def]  # 80 steps take seconds: it cannot finish first
            time.sleep(0.02)
            return execute(out)

        def record_abort(request_id: str, reason: str, error: str | None = None) -> bool:
            aborted.append(request_id)
            return abort(request_id, reason, error)

        decode.engine.execute, abort, decode._abort = slow_execute, decode._abort, record_abort

        async def scenario() -> None:
            await decode.reserve(ReserveRequest("long", PROMPT, sampling, prefill_locally=True))
            batches = decode.subscribe("router-0")
            decode.attach("router-0", "long")
            first = await anext(batches)
            assert first and all(c.request_id == "long" and c.finish_reason is None for c in first)
            await batches.aclose()  # the router's connection is gone: as a client disconnect, abort
            await _until_idle(decode)
            assert aborted == ["long"] and not decode._streams

        asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        decode.shutdown()
