"""Model-free worker clients that stream tokens as fast as asked, so a benchmark times the router alone."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from contracts.sampling import FinishReason
from contracts.stats import EngineStats, WorkerInfo
from decode_worker.api import NoCapacity, Reservation, ReserveRequest, TokenChunk
from prefill_worker.api import PrefillRequest, PrefillResult
from router.clients import DecodeClient, PrefillClient

FIRST_TOKEN = 100  # the fake model's output is FIRST_TOKEN, FIRST_TOKEN + 1, ... (never EOS)


class FastDecodeClient(DecodeClient):
    """A decode worker without a model. step_s > 0: every step_s one token goes to each stream at once, as a
    real decode batch does; step_s == 0: each stream gets its next token as soon as the router asks (the
    generator only yields the event loop between tokens). Each step's chunk carries `tokens_per_step` tokens
    (as a speculative step's accepted tokens do). `emitted[request_id]` holds the time.perf_counter() at which
    each token was handed over (CLOCK_MONOTONIC: comparable with another process's clock)."""

    def __init__(self, worker_id: str = "decode-fast", *, step_s: float = 0.0, tokens_per_step: int = 1,
                 max_num_seqs: int = 1024) -> None:
        self._worker_id = worker_id
        self.step_s = step_s
        self.tokens_per_step = tokens_per_step
        self.max_num_seqs = max_num_seqs
        self.emitted: dict[str, list[float]] = {}
        self._requests: dict[str, ReserveRequest] = {}
        self._kv_ready: dict[str, asyncio.Event] = {}
        self._aborted: set[str] = set()
        self._tick: asyncio.Future[None] | None = None
        self._stepper: asyncio.Task[None] | None = None

    @property
    def worker_id(self) -> str:
        return self._worker_id

    async def info(self) -> WorkerInfo:
        stats = EngineStats(num_free_blocks=1 << 20, num_total_blocks=1 << 20,
                            num_running=len(self._requests), num_waiting=0, queued_prefill_tokens=0,
                            max_num_seqs=self.max_num_seqs)
        return WorkerInfo(self._worker_id, "decode", "ready", stats)

    async def reserve(self, request: ReserveRequest) -> Reservation:
        if len(self._requests) >= self.max_num_seqs:
            raise NoCapacity(f"{self._worker_id}: all {self.max_num_seqs} sequence slots are taken")
        self._requests[request.request_id] = request
        ready = self._kv_ready[request.request_id] = asyncio.Event()
        if request.prefill_locally:
            ready.set()
        return Reservation(request.request_id, self._worker_id, ())

    def deliver_kv(self, request_id: str) -> None:
        self._kv_ready[request_id].set()

    async def recompute(self, request_id: str) -> bool:
        ready = self._kv_ready.get(request_id)
        if ready is None or ready.is_set():
            return False
        ready.set()
        return True

    async def _next_step(self) -> None:
        """Wait for the next batch step (one shared timer for every stream of this worker)."""
        if self._stepper is None:
            self._stepper = asyncio.create_task(self._step_loop(), name=f"{self._worker_id}-steps")
        if self._tick is None:
            self._tick = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._tick)

    async def _step_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            next_at += self.step_s
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            tick, self._tick = self._tick, None
            if tick is not None:
                tick.set_result(None)

    async def stream(self, request_id: str) -> AsyncIterator[TokenChunk]:
        req = self._requests[request_id]
        times = self.emitted.setdefault(request_id, [])
        await self._kv_ready[request_id].wait()
        n_prompt, max_tokens = len(req.prompt_token_ids), req.sampling.max_tokens
        try:
            for i in range(0, max_tokens, self.tokens_per_step):
                if self.step_s > 0:
                    await self._next_step()
                else:
                    await asyncio.sleep(0)
                if request_id in self._aborted:
                    break
                ids = tuple(range(FIRST_TOKEN + i, FIRST_TOKEN + min(i + self.tokens_per_step, max_tokens)))
                n = i + len(ids)
                last = n == max_tokens
                times.extend([time.perf_counter()] * len(ids))
                reason = FinishReason.LENGTH if last else None
                yield TokenChunk(request_id, ids, "x" * len(ids), reason, n_prompt, n)
                if last:
                    return
            yield TokenChunk(request_id, (), "", FinishReason.ABORT, n_prompt, 0)
        finally:
            self._requests.pop(request_id, None)
            self._kv_ready.pop(request_id, None)
            self._aborted.discard(request_id)

    async def abort(self, request_id: str) -> bool:
        if request_id not in self._requests:
            return False
        self._aborted.add(request_id)
        self._kv_ready[request_id].set()
        return True

    async def metrics_text(self) -> str:
        return ""

    async def close(self) -> None:
        if self._stepper is not None:
            self._stepper.cancel()
            await asyncio.gather(self._stepper, return_exceptions=True)


class FastPrefillClient(PrefillClient):
    """A prefill worker without a model: the KV 'arrives' at its decode worker at once."""

    def __init__(self, decoder: FastDecodeClient, worker_id: str = "prefill-fast") -> None:
        self._worker_id, self._decoder = worker_id, decoder

    @property
    def worker_id(self) -> str:
        return self._worker_id

    async def info(self) -> WorkerInfo:
        stats = EngineStats(num_free_blocks=1, num_total_blocks=1, num_running=0, num_waiting=0,
                            queued_prefill_tokens=0)
        return WorkerInfo(self._worker_id, "prefill", "ready", stats)

    async def prefill(self, request: PrefillRequest) -> PrefillResult:
        self._decoder.deliver_kv(request.request_id)
        return PrefillResult(request.request_id, FIRST_TOKEN, queue_seconds=0.0, prefill_seconds=0.0,
                             transfer_exposed_seconds=0.0)

    async def abort(self, request_id: str) -> bool:
        return False

    async def metrics_text(self) -> str:
        return ""
