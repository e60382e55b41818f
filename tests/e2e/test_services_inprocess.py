"""Prefill and decode services in one process (no Ray, no gRPC), joined by a real gloo KV channel."""
from __future__ import annotations

import asyncio

import pytest
import torch

from contracts.sampling import FinishReason, SamplingParams
from contracts.transfer import TransferTarget
from decode_worker.api import ReserveRequest
from decode_worker.service import DecodeService
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from kv_transfer.sender import KVSender
from prefill_worker.api import PrefillRequest
from prefill_worker.service import PrefillService
from tests.service_pair import connect_services

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# max_batch_tokens=32: long prompts take several chunks.
CONFIG = EngineConfig(device="cpu", num_kv_blocks=64, max_batch_tokens=32)
PROMPTS = [[1, 504, 3458, 282, 4649, 314], list(range(100, 170))]
UNSEEN = list(range(300, 370))  # a prompt no other test sends: nothing of it is in a prefix cache


@pytest.fixture(scope="module")
def services():
    decode = DecodeService("decode-0", CONFIG)
    prefill = PrefillService("prefill-0", CONFIG)
    connect_services(prefill, decode)
    yield prefill, decode
    prefill.shutdown()
    decode.shutdown()


async def _disaggregated(prefill: PrefillService, decode: DecodeService, rid: str, prompt: list[int],
                         sampling: SamplingParams) -> tuple[list[int], FinishReason | None]:
    reservation = await decode.reserve(ReserveRequest(rid, tuple(prompt), sampling))
    target = TransferTarget(rid, reservation.decode_id, reservation.block_ids, len(prompt),
                            start_token=reservation.start_token)
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


def test_a_prefix_the_decode_worker_holds_does_not_travel_again(services):
    prefill, decode = services
    greedy = SamplingParams(max_tokens=8, ignore_eos=True)
    prompt = list(range(400, 480))  # 5 blocks of 16; its first 4 are cached on both sides after one run
    expected = LLMEngine(CONFIG).generate([prompt], greedy)[0]

    def bytes_sent() -> float:
        return prefill.metrics.registry.get_sample_value("pdserve_kv_transfer_bytes_total",
                                                         {"dtype": prefill.layout.dtype}) or 0.0

    sent = []
    for rid in ("cold", "warm"):
        before = bytes_sent()
        got, _ = asyncio.run(_disaggregated(prefill, decode, rid, prompt, greedy))
        assert got == expected
        sent.append(bytes_sent() - before)
    assert sent[1] < sent[0] / 3  # one block of five (and the final frame) travelled
    assert decode.engine.stats().prefix_hit_tokens >= 64
    decode.engine.block_manager.check_invariants()


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


def test_blocks_of_a_transfer_cut_mid_way_are_reused_without_its_kv(services):
    """Half the layers of a transfer land (garbage), the request is aborted, its blocks go to a request
    prefilled locally; the rest of the garbage arrives after that: dropped, and the output is unaffected."""
    prefill, decode = services
    greedy = SamplingParams(max_tokens=16, ignore_eos=True)
    expected = LLMEngine(CONFIG).generate([UNSEEN], greedy)[0]
    layout, channel = prefill.layout, prefill._channels["decode-0"]
    garbage_k = torch.full_like(prefill.engine.kv_cache.k[0], 1e3)
    garbage_v = torch.full_like(prefill.engine.kv_cache.v[0], -1e3)
    half = layout.num_layers // 2
    free_before = decode.engine.stats().num_free_blocks

    async def scenario() -> None:
        victim = await decode.reserve(ReserveRequest("victim", tuple(UNSEEN), greedy))
        sender = KVSender(TransferTarget("victim", "decode-0", victim.block_ids, len(PROMPTS[1])), layout,
                          channel)
        source = list(range(len(victim.block_ids)))
        for layer in range(half):
            sender.send_layer(layer, garbage_k, garbage_v, source)
        receiver = decode._receivers["victim"]
        await _until(lambda: receiver.bytes_received > 0 and len(receiver._layers) == half)
        assert await decode.abort("victim")  # the transfer fails mid-way; its blocks are free again
        # Freed blocks queue up last: a filler takes all but the victim's and two spare (the reuser's decode
        # grows), so the request prefilled next lands in the victim's blocks.
        filler_blocks = decode.engine.stats().num_free_blocks - len(victim.block_ids) - 2
        filler = tuple(range(3, 3 + filler_blocks * CONFIG.block_size))
        await decode.reserve(ReserveRequest("filler", filler, SamplingParams(max_tokens=1)))
        await decode.reserve(ReserveRequest("reuser", tuple(UNSEEN), greedy, prefill_locally=True))
        ids: list[int] = []
        async for chunk in decode.stream("reuser"):
            if not ids:  # its prompt's KV is in the reused blocks now: the late garbage comes after it
                assert set(decode.engine.scheduler.get("reuser").block_table) & set(victim.block_ids)
                for layer in range(half, layout.num_layers):
                    sender.send_layer(layer, garbage_k, garbage_v, source)
                sender.send_final(0)
                await _until(lambda: sender.poll().terminal)
            ids.extend(chunk.token_ids)
        assert ids == expected
        assert await decode.abort("filler")

    asyncio.run(asyncio.wait_for(scenario(), 120))
    assert decode._endpoints["prefill-0"].frames_dropped >= layout.num_layers - half + 1
    assert decode.engine.stats().num_free_blocks == free_before


async def _until(predicate, timeout_s: float = 30.0) -> None:
    end = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < end, "condition not reached"
        await asyncio.sleep(0.01)
