"""In-process fakes for router tests: byte-level tokenizer, worker clients recording calls, router harness."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import httpx
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from contracts.model_info import ModelInfo
from contracts.sampling import FinishReason
from contracts.stats import EngineStats, WorkerInfo
from decode_worker.api import NoCapacity, Reservation, ReserveRequest, TokenChunk
from prefill_worker.api import PrefillFailed, PrefillRequest, PrefillResult
from proto.api import pb_grpc
from router.clients import DecodeClient, PrefillClient, WorkerUnavailable
from router.config import RouterConfig
from router.server import RouterServer, build_server

T = TypeVar("T")

BYTE_OFFSET = 3  # ids 0..2 are specials: 0 = EOS, 1 = BOS, 2 = PAD


def run(coro: Coroutine[Any, Any, T], timeout_s: float = 5.0) -> T:
    """Drive one async test body with a hard time limit (pytest-asyncio is not installed)."""
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


async def wait_until(predicate: Any, timeout_s: float = 2.0, what: str = "condition") -> None:
    """Poll a cheap predicate; effects of client cancellation arrive asynchronously on the server."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not predicate():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


class FakeTokenizer:
    """One token per UTF-8 byte (id = byte + 3); the chat template tags each message with its role."""

    vocab_size = 256 + BYTE_OFFSET
    eos_token_ids = (0,)

    def encode(self, text: str) -> list[int]:
        return [b + BYTE_OFFSET for b in text.encode()]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i - BYTE_OFFSET for i in ids if i >= BYTE_OFFSET).decode(errors="replace")

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return self.encode(text + "<assistant>")


def output_token(position: int) -> int:
    """The fake model's output: 'a', 'b', 'c', ... cycling; never EOS."""
    return BYTE_OFFSET + ord("a") + position % 26


@dataclass
class _Reserved:
    request: ReserveRequest
    block_ids: tuple[int, ...]
    kv_ready: asyncio.Event = field(default_factory=asyncio.Event)
    aborted: bool = False
    finished: bool = False


class FakeDecodeClient(DecodeClient):
    """Reserves blocks from a free list and one of `max_num_seqs` slots, waits for the fake prefill's KV (or
    prefills locally), then emits one token per step until max_tokens (LENGTH), a stop token (STOP), an abort
    or `fail_with` (ABORT). `info_delay_s` makes info() slow (a worker whose control plane lags)."""

    def __init__(
        self,
        worker_id: str = "decode-0",
        *,
        num_blocks: int = 64,
        block_size: int = 16,
        state: str = "ready",
        step_delay_s: float = 0.0,
        fail_with: str | None = None,
        die_after: int | None = None,
        max_num_seqs: int = 32,
        info_delay_s: float = 0.0,
    ) -> None:
        self._worker_id = worker_id
        self.state = state
        self.max_num_seqs = max_num_seqs
        self.info_delay_s = info_delay_s
        self.fail_with = fail_with  # after the first token, end every stream with ABORT + this error
        # After this many tokens of a stream the "process" dies: calls raise WorkerUnavailable and its
        # state is lost until `restart()` (what Ray does), which brings it back empty.
        self.die_after = die_after
        self.dead = False
        self.recompute_calls: list[str] = []
        self.block_size = block_size
        self.num_total_blocks = num_blocks
        self.free_blocks = list(range(num_blocks))
        self.step_delay_s = step_delay_s
        self.requests: dict[str, _Reserved] = {}
        self.reserve_calls: list[ReserveRequest] = []
        self.abort_calls: list[str] = []
        self.streams_opened: list[str] = []
        self._registry = CollectorRegistry()
        self.draft_tokens = Counter(
            "pdserve_spec_draft_tokens", "Draft tokens proposed", registry=self._registry
        )
        self.accepted_tokens = Counter(
            "pdserve_spec_accepted_tokens", "Draft tokens accepted", registry=self._registry
        )

    @property
    def worker_id(self) -> str:
        return self._worker_id

    def _check_alive(self) -> None:
        if self.dead:
            raise WorkerUnavailable(f"{self._worker_id} is gone (fake)")

    def restart(self) -> None:
        """A new incarnation: alive, empty, ready."""
        self.dead, self.die_after, self.state = False, None, "ready"
        self.requests.clear()
        self.free_blocks = list(range(self.num_total_blocks))

    def _live(self) -> list[_Reserved]:
        return [r for r in self.requests.values() if not r.finished]

    async def info(self) -> WorkerInfo:
        await asyncio.sleep(self.info_delay_s)
        self._check_alive()
        live = self._live()
        stats = EngineStats(
            num_free_blocks=len(self.free_blocks),
            num_total_blocks=self.num_total_blocks,
            num_running=sum(r.kv_ready.is_set() for r in live),
            num_waiting=sum(not r.kv_ready.is_set() for r in live),
            queued_prefill_tokens=0,
            max_num_seqs=self.max_num_seqs,
        )
        return WorkerInfo(self._worker_id, "decode", self.state, stats)

    async def reserve(self, request: ReserveRequest) -> Reservation:
        self._check_alive()
        self.reserve_calls.append(request)
        need = 0 if request.prefill_locally else math.ceil(len(request.prompt_token_ids) / self.block_size)
        if len(self._live()) >= self.max_num_seqs:
            raise NoCapacity(f"{self._worker_id}: all {self.max_num_seqs} sequence slots are taken")
        if need > len(self.free_blocks):
            raise NoCapacity(f"{self._worker_id}: {need} KV blocks needed, {len(self.free_blocks)} free")
        blocks, self.free_blocks = tuple(self.free_blocks[:need]), self.free_blocks[need:]
        reserved = _Reserved(request, blocks)
        if request.prefill_locally:
            reserved.kv_ready.set()
        self.requests[request.request_id] = reserved
        return Reservation(request.request_id, self._worker_id, blocks)

    def deliver_kv(self, request_id: str) -> None:
        """What the real KV receiver does when the last layer arrived."""
        self.requests[request_id].kv_ready.set()

    async def recompute(self, request_id: str) -> bool:
        self._check_alive()
        self.recompute_calls.append(request_id)
        r = self.requests.get(request_id)
        if r is None or r.finished or r.kv_ready.is_set():
            return False
        r.kv_ready.set()  # "prefilled" here
        return True

    def _release(self, r: _Reserved) -> None:
        if not r.finished:
            r.finished = True
            self.free_blocks.extend(r.block_ids)

    async def stream(self, request_id: str) -> AsyncIterator[TokenChunk]:
        self._check_alive()
        self.streams_opened.append(request_id)
        r = self.requests[request_id]
        n_prompt = len(r.request.prompt_token_ids)
        resumed = r.request.num_resumed_tokens  # a migrated request: its text so far comes first, no ids
        if resumed:
            ids = r.request.prompt_token_ids[-resumed:]
            yield TokenChunk(request_id, (), "".join(chr(t - BYTE_OFFSET) for t in ids), None, n_prompt, 0)
        await r.kv_ready.wait()
        sampling = r.request.sampling
        for i in range(sampling.max_tokens):
            if i:
                await asyncio.sleep(self.step_delay_s)
            if self.die_after is not None and i >= self.die_after:
                self.dead, self.state = True, "failed"
            self._check_alive()
            if r.aborted or (i and self.fail_with):
                break
            tok = output_token(resumed + i)
            self.draft_tokens.inc(2)
            self.accepted_tokens.inc(1)
            last = i + 1 == sampling.max_tokens
            reason = (
                FinishReason.STOP if tok in sampling.stop_token_ids else FinishReason.LENGTH if last else None
            )
            if reason is not None:
                self._release(r)
            yield TokenChunk(request_id, (tok,), chr(tok - BYTE_OFFSET), reason, n_prompt, i + 1)
            if reason is not None:
                return
        self._release(r)
        error = None if r.aborted else self.fail_with
        yield TokenChunk(request_id, (), "", FinishReason.ABORT, n_prompt, 0, error=error)

    async def abort(self, request_id: str) -> bool:
        self._check_alive()
        self.abort_calls.append(request_id)
        r = self.requests.get(request_id)
        if r is None or r.finished:
            return False
        r.aborted = True
        r.kv_ready.set()  # wake a stream still waiting for KV so it can end
        self._release(r)
        return True

    async def metrics_text(self) -> str:
        return generate_latest(self._registry).decode()


class FakePrefillClient(PrefillClient):
    """'Prefills' after `delay_s`, then hands the KV to the target fake decode worker. `fail_with` makes every
    prefill raise PrefillFailed; `hang` makes it wait until aborted; `info_delay_s` makes info() slow."""

    def __init__(
        self,
        worker_id: str = "prefill-0",
        *,
        decoders: Iterable[FakeDecodeClient] = (),
        state: str = "ready",
        delay_s: float = 0.0,
        fail_with: str | None = None,
        hang: bool = False,
        info_delay_s: float = 0.0,
    ) -> None:
        self._worker_id = worker_id
        self.info_delay_s = info_delay_s
        self.decoders = {d.worker_id: d for d in decoders}
        self.state = state
        self.delay_s = delay_s
        self.fail_with = fail_with
        self.hang = hang
        self.prefill_calls: list[PrefillRequest] = []
        self.abort_calls: list[str] = []
        self._running: dict[str, asyncio.Event] = {}
        self._registry = CollectorRegistry()
        self.bytes_sent = Counter(
            "pdserve_kv_transfer_bytes", "KV bytes sent", ["dtype"], registry=self._registry
        )
        self.transfer_seconds = Histogram(
            "pdserve_kv_transfer_seconds", "Per-request KV transfer time", registry=self._registry
        )

    @property
    def worker_id(self) -> str:
        return self._worker_id

    async def info(self) -> WorkerInfo:
        await asyncio.sleep(self.info_delay_s)
        queued = sum(len(p.prompt_token_ids) for p in self.prefill_calls if p.request_id in self._running)
        stats = EngineStats(
            num_free_blocks=64,
            num_total_blocks=64,
            num_running=len(self._running),
            num_waiting=0,
            queued_prefill_tokens=queued,
        )
        return WorkerInfo(self._worker_id, "prefill", self.state, stats)

    async def prefill(self, request: PrefillRequest) -> PrefillResult:
        self.prefill_calls.append(request)
        if self.fail_with is not None:
            raise PrefillFailed(self.fail_with)
        aborted = self._running[request.request_id] = asyncio.Event()
        try:
            if self.hang:
                await aborted.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(aborted.wait(), self.delay_s)
            if aborted.is_set():
                raise PrefillFailed("aborted")
        finally:
            del self._running[request.request_id]
        self.bytes_sent.labels(dtype="int8").inc(1024 * len(request.prompt_token_ids))
        self.transfer_seconds.observe(0.001)
        self.decoders[request.target.decode_id].deliver_kv(request.request_id)
        return PrefillResult(
            request.request_id,
            output_token(0),
            queue_seconds=0.0,
            prefill_seconds=self.delay_s,
            transfer_exposed_seconds=0.0,
        )

    async def abort(self, request_id: str) -> bool:
        self.abort_calls.append(request_id)
        event = self._running.get(request_id)
        if event is None:
            return False
        event.set()
        return True

    async def metrics_text(self) -> str:
        return generate_latest(self._registry).decode()


def fake_cluster(
    num_prefill: int = 1, num_decode: int = 1, **decode_kw: Any
) -> tuple[list[FakePrefillClient], list[FakeDecodeClient]]:
    decoders = [FakeDecodeClient(f"decode-{i}", **decode_kw) for i in range(num_decode)]
    return [FakePrefillClient(f"prefill-{i}", decoders=decoders) for i in range(num_prefill)], decoders


FAKE_MODEL = ModelInfo(
    model_name="fake-byte-model",
    context_length=256,
    vocab_size=FakeTokenizer.vocab_size,
    kv_cache_dtype="int8",
    weight_dtype="q4_1",
    compute_dtype="float32",
    weights="w8a8",
)


@dataclass
class RouterHarness:
    server: RouterServer
    channel: grpc.aio.Channel
    stub: pb_grpc.PDServeStub


@contextlib.asynccontextmanager
async def serve_router(
    prefill: Iterable[PrefillClient], decode: Iterable[DecodeClient], **config_kw: Any
) -> AsyncIterator[RouterHarness]:
    """A real grpc.aio router on 127.0.0.1:<free port> over the given clients, plus a connected stub."""
    cfg = {
        "port": 0,
        "metrics_port": None,
        "worker_refresh_s": 0.05,
        "worker_call_timeout_s": 1.0,
    } | config_kw
    server = build_server(RouterConfig(**cfg), list(prefill), list(decode), FakeTokenizer(), FAKE_MODEL)
    await server.start()
    channel = grpc.aio.insecure_channel(server.address)
    try:
        yield RouterHarness(server, channel, pb_grpc.PDServeStub(channel))
    finally:
        await channel.close()
        await server.stop(grace=None)


@contextlib.asynccontextmanager
async def serve_http(
    prefill: Iterable[PrefillClient], decode: Iterable[DecodeClient], **config_kw: Any
) -> AsyncIterator[tuple[RouterHarness, httpx.AsyncClient]]:
    """serve_router with its OpenAI-compatible HTTP door on a free loopback port, plus a client for it."""
    async with serve_router(prefill, decode, http_port=0, **config_kw) as h:
        base = f"http://127.0.0.1:{h.server.http_port}"
        async with httpx.AsyncClient(base_url=base, timeout=10.0) as client:
            yield h, client
