"""What a request carries from a dead decode worker to the next one: the token ids and text its client has."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from contracts.sampling import SamplingParams
from contracts.stats import WorkerInfo
from decode_worker.api import ReserveRequest
from router.clients import WorkerUnavailable
from router.workers import DECODE, WorkerPool


@dataclass
class Streamed:
    """The client's view of one request's output so far, so another worker can continue exactly there."""

    output_ids: list[int] = field(default_factory=list)
    chars_sent: int = 0
    migrations: int = 0
    lost: set[str] = field(default_factory=set)  # decode workers that died under this request
    _skip_chars: int = 0  # of the current worker's text: characters the client already has

    def relay(self, token_ids: Sequence[int], text: str) -> str:
        """Record a chunk on its way to the client; returns the text it still lacks (a new worker first
        re-emits the text of the resumed tokens)."""
        if self._skip_chars:
            cut = min(self._skip_chars, len(text))
            text, self._skip_chars = text[cut:], self._skip_chars - cut
        self.output_ids.extend(token_ids)
        self.chars_sent += len(text)
        return text

    def migrate(self, dead_worker: str) -> None:
        self.migrations += 1
        self.lost.add(dead_worker)
        self._skip_chars = self.chars_sent

    def reserve_request(self, request_id: str, prompt: tuple[int, ...], sampling: SamplingParams,
                        local: bool) -> ReserveRequest:
        """The next attempt: prompt + streamed ids, the tokens left to generate, the resumed count."""
        resumed = len(self.output_ids)
        if resumed:
            sampling = dataclasses.replace(sampling, max_tokens=sampling.max_tokens - resumed)
        return ReserveRequest(request_id, prompt + tuple(self.output_ids), sampling, prefill_locally=local,
                              num_resumed_tokens=resumed)


async def decode_comes_back(pool: WorkerPool, wait_s: float) -> bool:
    """No decode worker is ready for a new request: True as soon as the pool's refresh sees one ready again,
    waiting at most wait_s and only while the pool holds one that can come back (starting, or failed and being
    restarted by Ray); False at once with none, or after wait_s."""
    if not any(i.role == DECODE for i in pool.infos()):
        return False
    loop = asyncio.get_running_loop()
    end = loop.time() + wait_s
    while not pool.ready(DECODE):
        if loop.time() >= end:
            return False
        await asyncio.sleep(0.05)
    return True


async def wait_for_ready_decode(pool: WorkerPool, call_timeout_s: float) -> WorkerInfo:
    """The first decode worker that answers ready, asked afresh (a dead worker's stale "ready" is not
    trusted): after the only decode worker died, the wait for Ray to restart it. The caller's deadline bounds
    it."""
    while True:
        for wid in [i.worker_id for i in pool.infos() if i.role == DECODE]:
            try:
                info = await asyncio.wait_for(pool.decode(wid).info(), call_timeout_s)
            except (WorkerUnavailable, TimeoutError, KeyError):  # KeyError: scaled away meanwhile
                continue
            if info.state == "ready":
                return info
        await asyncio.sleep(0.25)
