"""A remotely prefilled request's first token leaves the decode worker when its KV is admitted, not after the
engine step that runs next (which may be a long local prefill: all of that wait would count in TTFT)."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from contracts.sampling import SamplingParams
from decode_worker.api import ReserveRequest
from decode_worker.service import DecodeService
from engine.config import EngineConfig
from kv_transfer.state import TransferState

pytestmark = pytest.mark.timeout(120)

CONFIG = EngineConfig(model_path="random:tiny", device="cpu", block_size=4, num_kv_blocks=32)
FIRST_TOKEN = 7


def test_the_first_token_is_handed_on_before_the_next_step_executes() -> None:
    decode = DecodeService("decode-0", CONFIG)
    sampling = SamplingParams(max_tokens=4, ignore_eos=True)
    queued_at_execute: list[list[tuple[int, ...]]] = []  # the remote request's chunks not yet handed on
    original_execute = decode._execute

    def execute(out):
        queued_at_execute.append([c.token_ids for _, c in decode._outbox if c.request_id == "remote"])
        return original_execute(out)

    def land() -> None:  # engine thread: the transfer completes (its frames are not what this test is about)
        decode._receivers["remote"] = SimpleNamespace(
            poll=lambda: TransferState.DONE, bytes_received=0, landing=None, first_token_id=FIRST_TOKEN,
            draft_features=None)
        decode._execute = execute
        decode._thread.wake()

    try:
        async def scenario() -> list[int]:
            await decode.reserve(ReserveRequest("remote", (1, 2, 3, 4, 5), sampling, prefill_locally=False))
            decode.attach("router-0", "remote")
            batches = decode.subscribe("router-0")
            await decode._on_engine_thread(land)
            tokens: list[int] = []
            async for batch in batches:
                for chunk in batch:
                    tokens.extend(chunk.token_ids)
                if len(tokens) >= sampling.max_tokens:
                    break
            await batches.aclose()
            return tokens

        tokens = asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        decode.shutdown()
    assert tokens[0] == FIRST_TOKEN and len(tokens) == sampling.max_tokens
    assert queued_at_execute, "the admitted request never reached a step"
    assert all(not queued for queued in queued_at_execute)  # the first token had left before any step ran
