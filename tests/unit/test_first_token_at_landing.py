"""A remotely prefilled request's first token leaves when its KV lands, even while the decode worker is inside
a long step; a first token that ends the request, an abort and a stop string stay exact."""
from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest

from contracts.sampling import FinishReason, SamplingParams
from decode_worker.api import ReserveRequest, TokenChunk
from decode_worker.first_token import Admitted, FirstTokenRelay
from decode_worker.service import DecodeService
from decode_worker.streams import RequestStream
from engine.config import EngineConfig
from engine.detokenizer import DetokenizedDelta
from engine.llm_engine import LLMEngine
from kv_transfer.state import TransferState

pytestmark = pytest.mark.timeout(120)

CONFIG = EngineConfig(model_path="random:tiny", device="cpu", block_size=4, num_kv_blocks=64)
FIRST, EOS = 7, 2


def done(request_id: str, token: int = FIRST, target: object = None) -> SimpleNamespace:
    """A receiver whose transfer just completed (its frames are not what these tests are about)."""
    return SimpleNamespace(state=TransferState.DONE, poll=lambda: TransferState.DONE, first_token_id=token,
                           target=target or SimpleNamespace(request_id=request_id), bytes_received=0,
                           landing=None, draft_features=None)


def test_the_first_token_leaves_at_landing_while_a_long_step_runs() -> None:
    decode = DecodeService("decode-0", CONFIG)
    sampling = SamplingParams(max_tokens=4, ignore_eos=True)
    in_step, release = threading.Event(), threading.Event()
    original_execute = decode._execute

    def execute(out):  # the local prompt's prefill step runs until the test releases it
        if any(c.seq.request_id == "local" for c in out.chunks) and not release.is_set():
            in_step.set()
            release.wait(30)
        return original_execute(out)

    decode._execute = execute

    async def scenario() -> tuple[list[TokenChunk], list[int]]:
        await decode.reserve(ReserveRequest("remote", (1, 2, 3, 4, 5), sampling, prefill_locally=False))
        decode.attach("router-0", "remote")
        batches = decode.subscribe("router-0")
        await decode.reserve(ReserveRequest("local", tuple(range(1, 41)), sampling, prefill_locally=True))
        await asyncio.to_thread(in_step.wait, 30)
        real = decode._receivers["remote"]
        decode._receivers["remote"] = done("remote", target=real.target)  # the engine thread is in its step
        real._on_finish(decode._receivers["remote"])  # as the endpoint's reader thread calls it
        first = await asyncio.wait_for(anext(batches), 5)  # old code: nothing until the step ends
        still_in_step = not release.is_set()
        release.set()
        tokens = [t for c in first for t in c.token_ids]
        async for batch in batches:
            tokens += [t for c in batch for t in c.token_ids]
            if len(tokens) >= sampling.max_tokens:
                break
        await batches.aclose()
        assert still_in_step
        return list(first), tokens

    try:
        first, tokens = asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        release.set()
        decode.shutdown()
    assert [c.token_ids for c in first] == [(FIRST,)] and first[0].num_output_tokens == 1
    assert len(tokens) == sampling.max_tokens and tokens[0] == FIRST  # sent once, then decoded on


def test_a_first_token_that_ends_the_request_is_finished_at_admission_and_frees_its_blocks() -> None:
    decode = DecodeService("decode-0", CONFIG)

    async def scenario() -> list[TokenChunk]:
        await decode.reserve(ReserveRequest("one", (1, 2, 3, 4, 5), SamplingParams(max_tokens=1),
                                            prefill_locally=False))
        real = decode._receivers["one"]

        def land() -> None:
            decode._receivers["one"] = done("one", target=real.target)
            real._on_finish(decode._receivers["one"])

        await decode._on_engine_thread(land)
        chunks = []
        async for chunk in decode.stream("one"):
            chunks.append(chunk)
        return chunks

    try:
        chunks = asyncio.run(asyncio.wait_for(scenario(), 60))
        stats = asyncio.run(decode.info()).stats
    finally:
        decode.shutdown()
    assert [(c.token_ids, c.finish_reason) for c in chunks] == [((FIRST,), FinishReason.LENGTH)]
    assert stats.num_free_blocks == stats.num_total_blocks and stats.num_running == 0


class StopAt:
    """A detokenizer whose stop string is reached by token `stop`."""

    def __init__(self, stop: int) -> None:
        self.stop, self.added = stop, []

    def add(self, token_ids):
        self.added += token_ids
        return DetokenizedDelta("" if self.stop in token_ids else "x", self.stop in token_ids)


def relay_and_stream(detok=None,
                     **sampling) -> tuple[FirstTokenRelay, RequestStream, asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    stream = RequestStream(loop, asyncio.Queue(), detok, 5)
    # The engine's own stop rules, on a scheduler that needs nothing else for them.
    scheduler = SimpleNamespace(config=SimpleNamespace(eos_token_ids=(EOS,)), max_len=64)
    engine = SimpleNamespace(scheduler=scheduler)
    relay = FirstTokenRelay(lambda *args: LLMEngine.ends_at_first_token(engine, *args))
    relay.expect("r", stream, (1, 2, 3, 4, 5), SamplingParams(**sampling), num_resumed_tokens=0)
    return relay, stream, loop


def sent(stream: RequestStream, loop: asyncio.AbstractEventLoop) -> list[TokenChunk]:
    loop.run_until_complete(asyncio.sleep(0))  # run the delivery callbacks
    loop.close()
    return [stream.queue.get_nowait() for _ in range(stream.queue.qsize())]


@pytest.mark.parametrize("token,sampling",
                         [(EOS, {}), (9, {"stop_token_ids": (9,)}), (FIRST, {"max_tokens": 1})])
def test_a_first_token_that_ends_the_request_is_left_to_admission(token, sampling) -> None:
    relay, stream, loop = relay_and_stream(**sampling)
    relay.landed(done("r", token))
    assert relay.admit("r") == Admitted(False) and sent(stream, loop) == []


def test_eos_is_sent_at_landing_when_the_request_ignores_it() -> None:
    relay, stream, loop = relay_and_stream(ignore_eos=True)
    relay.landed(done("r", EOS))
    assert relay.admit("r") == Admitted(True) and [c.token_ids for c in sent(stream, loop)] == [(EOS,)]


def test_after_an_abort_or_an_admission_a_landing_sends_nothing() -> None:
    relay, stream, loop = relay_and_stream()
    relay.forget("r")
    relay.landed(done("r"))
    assert relay.admit("r") == Admitted(False) and sent(stream, loop) == []
    relay, stream, loop = relay_and_stream()
    assert relay.admit("r") == Admitted(False)  # admission polled DONE before the landing callback ran
    relay.landed(done("r"))
    assert sent(stream, loop) == []


def test_a_first_token_reaching_a_stop_string_is_detokenized_once_and_finished_at_admission() -> None:
    detok = StopAt(FIRST)
    relay, stream, loop = relay_and_stream(detok)
    relay.landed(done("r"))
    admitted = relay.admit("r")
    assert not admitted.sent and admitted.delta == DetokenizedDelta("", True) and detok.added == [FIRST]
    assert sent(stream, loop) == []
