"""Prefill and decode services in one process (no Ray, no gRPC), joined by a real gloo KV channel."""
from __future__ import annotations

import asyncio
import threading

import pytest

from contracts.sampling import FinishReason, SamplingParams
from contracts.transfer import TransferTarget
from decode_worker.api import ReserveRequest
from decode_worker.service import DecodeService
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from prefill_worker.api import PrefillRequest
from prefill_worker.service import PrefillService

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# max_batch_tokens=32: long prompts take several chunks.
CONFIG = EngineConfig(device="cpu", num_kv_blocks=64, max_batch_tokens=32)
PROMPTS = [[1, 504, 3458, 282, 4649, 314], list(range(100, 170))]


@pytest.fixture(scope="module")
def services():
    decode = DecodeService("decode-0", CONFIG)
    prefill = PrefillService("prefill-0", CONFIG)
    accept = threading.Thread(target=decode.accept_channel, args=("prefill-0",))
    accept.start()
    prefill.connect_channel(decode.channel_address())
    accept.join(timeout=60)
    yield prefill, decode
    prefill.shutdown()
    decode.shutdown()


async def _disaggregated(prefill: PrefillService, decode: DecodeService, rid: str, prompt: list[int],
                         sampling: SamplingParams) -> tuple[list[int], FinishReason | None]:
    reservation = await decode.reserve(ReserveRequest(rid, tuple(prompt), sampling))
    target = TransferTarget(rid, reservation.decode_id, reservation.block_ids, len(prompt))
    ids, reason = [], None

    async def consume() -> None:
        nonlocal reason
        async for chunk in decode.stream(rid):
            ids.extend(chunk.token_ids)
            reason = chunk.finish_reason

    consumer = asyncio.create_task(consume())
    result = await prefill.prefill(PrefillRequest(rid, tuple(prompt), sampling, target))
    await consumer
    assert result.first_token_id == ids[0]
    return ids, reason


def test_disaggregated_matches_colocated_greedy_and_seeded(services):
    prefill, decode = services
    free_before = decode.engine.stats().num_free_blocks
    reference = LLMEngine(CONFIG)
    for sampling in (SamplingParams(max_tokens=12, ignore_eos=True),
                     SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.8, top_k=40, seed=7)):
        expected = reference.generate(PROMPTS, sampling)
        for i, prompt in enumerate(PROMPTS):
            got, reason = asyncio.run(
                _disaggregated(prefill, decode, f"r{i}-{sampling.seed}", prompt, sampling))
            assert got == expected[i]
            assert reason is FinishReason.LENGTH
    assert decode.engine.stats().num_free_blocks == free_before
    assert prefill.engine.stats().num_free_blocks == prefill.engine.stats().num_total_blocks


def test_abort_while_awaiting_kv_frees_reserved_blocks(services):
    _, decode = services
    free_before = decode.engine.stats().num_free_blocks

    async def scenario() -> None:
        await decode.reserve(ReserveRequest("orphan", tuple(PROMPTS[1]), SamplingParams(max_tokens=4)))
        assert decode.engine.stats().num_free_blocks < free_before
        assert await decode.abort("orphan")
        assert not await decode.abort("orphan")  # second abort finds nothing: freed exactly once

    asyncio.run(scenario())
    assert decode.engine.stats().num_free_blocks == free_before
