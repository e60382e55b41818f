"""A worker whose engine thread dies ends every waiting request with the error instead of hanging it."""
from __future__ import annotations

import asyncio

import pytest

from contracts.sampling import FinishReason, SamplingParams
from contracts.transfer import TransferTarget
from decode_worker.api import ReserveRequest
from decode_worker.service import DecodeService
from engine.config import EngineConfig
from prefill_worker.api import PrefillFailed, PrefillRequest
from prefill_worker.service import PrefillService
from tests.service_pair import connect_services

pytestmark = pytest.mark.timeout(120)

CONFIG = EngineConfig(model_path="random:tiny", device="cpu", block_size=4, num_kv_blocks=16)
SAMPLING = SamplingParams(max_tokens=4, ignore_eos=True)
PROMPT = (1, 2, 3, 4, 5)


def _boom() -> None:
    raise RuntimeError("broken step")


def test_decode_streams_end_with_the_error_when_its_engine_dies() -> None:
    decode = DecodeService("decode-0", CONFIG)
    try:
        async def scenario() -> None:
            await decode.reserve(ReserveRequest("awaiting-kv", PROMPT, SAMPLING))
            decode.engine.schedule = _boom  # the next step with work raises
            await decode.reserve(ReserveRequest("local", PROMPT, SAMPLING, prefill_locally=True))
            for rid in ("local", "awaiting-kv"):
                chunks = [chunk async for chunk in decode.stream(rid)]
                assert chunks[-1].finish_reason is FinishReason.ABORT
                assert "decode-0 engine thread died: RuntimeError: broken step" in chunks[-1].error
            assert (await decode.info()).state == "failed"

        asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        decode.shutdown()


@pytest.mark.parametrize("policy", ["fail", "recompute"])
def test_prefill_fails_its_callers_when_its_engine_dies(policy: str) -> None:
    decode = DecodeService("decode-0", CONFIG, kv_failure_policy=policy)
    prefill = PrefillService("prefill-0", CONFIG)
    try:
        connect_services(prefill, decode)

        async def scenario() -> None:
            reservation = await decode.reserve(ReserveRequest("r", PROMPT, SAMPLING))
            target = TransferTarget("r", "decode-0", reservation.block_ids, len(PROMPT))
            prefill.engine.schedule = _boom
            died = "prefill-0 engine thread died: RuntimeError: broken step"
            with pytest.raises(PrefillFailed, match=died):
                await prefill.prefill(PrefillRequest("r", PROMPT, SAMPLING, target))
            assert (await prefill.info()).state == "failed"
            # The sender's ABORT frame reached the decode side now, not at the lease: with "fail" the request
            # ends with the reason; with "recompute" the decode worker prefills the prompt itself.
            chunks = [chunk async for chunk in decode.stream("r")]
            if policy == "fail":
                assert chunks[-1].finish_reason is FinishReason.ABORT
                assert "KV transfer failed: peer_aborted" in chunks[-1].error
            else:
                assert chunks[-1].finish_reason is FinishReason.LENGTH
                assert sum(len(c.token_ids) for c in chunks) == SAMPLING.max_tokens
            assert (await decode.info()).stats.num_free_blocks == CONFIG.num_kv_blocks

        asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        prefill.shutdown()
        decode.shutdown()
