"""Decode worker without Ray: reserve blocks, receive KV, decode in a continuous batch, stream tokens."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from decode_worker.api import NoCapacity, Reservation, ReserveRequest, TokenChunk
from decode_worker.metrics import DecodeMetrics
from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.engine_thread import EngineThread
from engine.executor import RunOutput
from engine.llm_engine import LLMEngine
from engine.model_files import resolve_model_path
from engine.random_models import is_random_model
from engine.scheduler import SchedulerOutput
from engine.sequence import FinishReason, Sequence
from engine.stats import EngineStats, WorkerInfo
from engine.tokenizer import Tokenizer
from kv_transfer.dist_channel import ChannelListener
from kv_transfer.layout import layout_of_cache
from kv_transfer.receiver import KVReceiveEndpoint, KVReceiver
from kv_transfer.state import TransferState
from kv_transfer.target import ChannelAddress, TransferTarget

log = logging.getLogger(__name__)


@dataclass
class _Stream:
    """The actor-side end of one request's token stream; the engine thread pushes into it thread-safely."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    detok: IncrementalDetokenizer | None
    num_prompt_tokens: int

    def push(self, chunk: TokenChunk) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, chunk)

    def flush_text(self) -> str:
        """Text the detokenizer held back (a possible stop-string prefix), released when the sequence ends."""
        return self.detok.finish() if self.detok is not None else ""


class DecodeService:
    def __init__(self, worker_id: str, config: EngineConfig, host: str = "127.0.0.1",
                 kv_lease_seconds: float = 120.0, progress: bool = False) -> None:
        self.worker_id = worker_id
        self.config = config
        self.engine = LLMEngine(config, progress=progress)
        # Random-weight models (speed work) have no tokenizer: their streams carry token ids and empty text.
        self.tokenizer = None if is_random_model(config.model_path) else \
            Tokenizer.from_model(resolve_model_path(config.model_path))
        self.layout = layout_of_cache(self.engine.kv_cache.k)
        self.metrics = DecodeMetrics(worker_id)
        self._lease = kv_lease_seconds
        self._listener = ChannelListener(host=host, port=0, device=config.device)
        self._endpoints: dict[str, KVReceiveEndpoint] = {}
        self._receivers: dict[str, KVReceiver] = {}  # engine thread only
        self._active: dict[str, _Stream] = {}  # engine thread only
        self._streams: dict[str, _Stream] = {}  # actor loop only
        self._thread = EngineThread(f"decode-{worker_id}", self._step)
        self._thread.start()

    # ---- control plane (called from the actor's event loop) ----

    def channel_address(self) -> ChannelAddress:
        host, port = self._listener.address
        return ChannelAddress(host=host, port=port, decode_id=self.worker_id)

    def accept_channel(self, peer_id: str, timeout: float = 120.0) -> None:
        """Blocks until prefill worker `peer_id` joins; then its frames land in this worker's KV cache."""
        channel = self._listener.accept(peer_id, self.layout, timeout=timeout)
        endpoint = KVReceiveEndpoint(channel, self.layout, self.engine.kv_cache.k, self.engine.kv_cache.v)
        endpoint.start()
        self._thread.submit(lambda: self._endpoints.__setitem__(peer_id, endpoint)).result()

    async def info(self) -> WorkerInfo:
        if not self._thread.alive:
            stats = EngineStats(0, self.config.num_kv_blocks, 0, 0, 0)
            return WorkerInfo(self.worker_id, "decode", "failed", stats)
        stats = await asyncio.wrap_future(self._thread.submit(self.engine.stats))
        return WorkerInfo(self.worker_id, "decode", "ready", stats)

    async def reserve(self, req: ReserveRequest) -> Reservation:
        if req.request_id in self._streams:
            raise ValueError(f"request_id {req.request_id!r} is already active on {self.worker_id}")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(),
                         self._detokenizer(req),
                         len(req.prompt_token_ids))
        reservation = await asyncio.wrap_future(self._thread.submit(lambda: self._reserve(req, stream)))
        self._streams[req.request_id] = stream
        return reservation

    def _detokenizer(self, req: ReserveRequest) -> IncrementalDetokenizer | None:
        if self.tokenizer is None:
            return None
        return IncrementalDetokenizer(self.tokenizer, list(req.prompt_token_ids), req.sampling.stop)

    async def stream(self, request_id: str) -> AsyncIterator[TokenChunk]:
        stream = self._streams.get(request_id)
        if stream is None:
            raise KeyError(f"no reserved request {request_id!r} on {self.worker_id}")
        finished = False
        try:
            while True:
                chunk = await stream.queue.get()
                finished = chunk.finish_reason is not None
                yield chunk
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:  # consumer went away mid-stream: client disconnect = abort
                await self.abort(request_id)

    async def abort(self, request_id: str) -> bool:
        return await asyncio.wrap_future(self._thread.submit(lambda: self._abort(request_id, "abort")))

    def shutdown(self) -> None:
        self._thread.stop()
        for endpoint in self._endpoints.values():
            endpoint.stop()
        self._listener.close()

    # ---- engine thread ----

    def _reserve(self, req: ReserveRequest, stream: _Stream) -> Reservation:
        seq = Sequence(req.request_id, list(req.prompt_token_ids), req.sampling)
        if req.prefill_locally:
            self.engine.scheduler.add(seq)
            self._active[req.request_id] = stream
            return Reservation(req.request_id, self.worker_id, ())
        if not self.engine.scheduler.reserve(seq):
            raise NoCapacity(f"{self.worker_id}: no room for {seq.num_tokens} prompt tokens "
                             f"({self.engine.scheduler.stats().num_free_blocks} free KV blocks)")
        target = TransferTarget(req.request_id, self.worker_id, tuple(seq.block_table), seq.num_tokens)
        # on_finish runs on the endpoint thread when the last frame lands: wake the engine to admit it now.
        receiver = KVReceiver(target, self.layout, lease_seconds=self._lease,
                              on_finish=lambda _: self._thread.wake())
        # The prefill worker is picked after this returns: listen for the request on every channel.
        for endpoint in self._endpoints.values():
            endpoint.register(receiver)
        self._receivers[req.request_id] = receiver
        self._active[req.request_id] = stream
        return Reservation(req.request_id, self.worker_id, target.block_ids)

    def _abort(self, request_id: str, reason: str, error: str | None = None) -> bool:
        receiver = self._receivers.pop(request_id, None)
        if receiver is not None:
            receiver.abort(reason)
        seq = self.engine.scheduler.abort(request_id)
        stream = self._active.pop(request_id, None)
        if stream is not None:
            n_out = seq.num_output_tokens if seq is not None else 0
            stream.push(TokenChunk(request_id, (), stream.flush_text(), FinishReason.ABORT,
                                   stream.num_prompt_tokens, n_out, error))
        return receiver is not None or seq is not None or stream is not None

    def _step(self) -> bool:
        """One step, read aloud: admit arrived KV → schedule → execute → postprocess → stream tokens."""
        did_work = self._poll_receivers()
        if not self.engine.has_work():
            return did_work
        out = self.engine.schedule()
        if out.num_batched_tokens == 0:
            return did_work
        run = self.engine.execute(out)
        finished = self.engine.postprocess(out, run)
        self._emit(out, run, finished)
        return True

    def _poll_receivers(self) -> bool:
        changed = False
        for request_id, receiver in list(self._receivers.items()):
            state = receiver.poll()
            if state is TransferState.DONE:
                del self._receivers[request_id]
                self.metrics.transfer_received(receiver.bytes_received)
                seq = self.engine.scheduler.activate(request_id, receiver.first_token_id)
                self._push_tokens(seq, [receiver.first_token_id])
                changed = True
            elif state is TransferState.FAILED:
                reason = receiver.failure_reason or "unknown"
                self.metrics.transfer_failed(reason)
                log.warning("KV transfer for %s failed: %s", request_id, reason)
                self._abort(request_id, reason, error=f"KV transfer failed: {reason}")
                changed = True
        return changed

    def _emit(self, out: SchedulerOutput, run: RunOutput, finished: list[Sequence]) -> None:
        for chunk in out.chunks:
            if chunk.num_sampled and chunk.seq.request_id in run.sampled:
                accepted = chunk.seq.token_ids[chunk.output_start:]  # what postprocess appended
                if accepted:
                    self._push_tokens(chunk.seq, accepted)

    def _push_tokens(self, seq: Sequence, token_ids: list[int]) -> None:
        stream = self._active.get(seq.request_id)
        if stream is None:
            return
        reason = seq.finish_reason if seq.is_finished else None
        text, stopped = "", False
        if stream.detok is not None:
            delta = stream.detok.add(token_ids)
            text, stopped = delta.text, delta.stopped
        if stopped:  # stop string: finish now and free the blocks (a no-op if the sequence already ended)
            self.engine.scheduler.abort(seq.request_id)
            reason = FinishReason.STOP
        elif reason is not None:
            text += stream.flush_text()
        self.metrics.tokens_generated(len(token_ids))
        stream.push(TokenChunk(seq.request_id, tuple(token_ids), text, reason,
                               seq.num_prompt_tokens, seq.num_output_tokens))
        if reason is not None:
            del self._active[seq.request_id]
