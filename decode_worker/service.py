"""Decode worker without Ray: reserve blocks, receive KV, decode in a continuous batch, stream tokens."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from contracts.sampling import FinishReason
from contracts.transfer import ChannelAddress, TransferTarget
from decode_worker.api import NoCapacity, Reservation, ReserveRequest, TokenChunk
from decode_worker.metrics import DecodeMetrics
from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.model_files import resolve_model_path
from engine.model_runner import RunOutput
from engine.random_models import is_random_model
from engine.scheduler import SchedulerOutput
from engine.sequence import Sequence
from engine.tokenizer import Tokenizer
from engine.worker_shell import WorkerService
from kv_transfer.dist_channel import ChannelListener
from kv_transfer.layout import KVLayout
from kv_transfer.receiver import KVReceiveEndpoint, KVReceiver
from kv_transfer.state import TransferState

log = logging.getLogger(__name__)


@dataclass
class _Stream:
    """The actor-side end of one request's token stream; the engine thread pushes into it thread-safely."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    detok: IncrementalDetokenizer | None
    num_prompt_tokens: int
    num_output_tokens: int = 0  # as of the last chunk pushed (engine thread)

    def push(self, chunk: TokenChunk) -> None:
        self.num_output_tokens = chunk.num_output_tokens
        self.loop.call_soon_threadsafe(self.queue.put_nowait, chunk)

    def flush_text(self) -> str:
        """Text the detokenizer held back (a possible stop-string prefix), released when the sequence ends."""
        return self.detok.finish() if self.detok is not None else ""


class DecodeService(WorkerService):
    role = "decode"

    def __init__(self, worker_id: str, config: EngineConfig, host: str = "127.0.0.1",
                 kv_lease_seconds: float = 120.0, progress: bool = False) -> None:
        super().__init__(worker_id, config, progress=progress)
        # Random-weight models (speed work) have no tokenizer: their streams carry token ids and empty text.
        self.tokenizer = None if is_random_model(config.model_path) else \
            Tokenizer.from_model(resolve_model_path(config.model_path))
        self.layout = KVLayout(self.engine.kv_cache.spec, self.engine.kv_cache.num_layers)
        self.metrics = DecodeMetrics(worker_id)
        self._lease = kv_lease_seconds
        self._listener = ChannelListener(host=host, port=0, device=config.device)
        self._endpoints: dict[str, KVReceiveEndpoint] = {}
        self._receivers: dict[str, KVReceiver] = {}  # engine thread only
        self._active: dict[str, _Stream] = {}  # engine thread only
        self._streams: dict[str, _Stream] = {}  # actor loop only
        self.start()

    # ---- control plane (called from the actor's event loop) ----

    def channel_address(self) -> ChannelAddress:
        host, port = self._listener.address
        return ChannelAddress(host=host, port=port, decode_id=self.worker_id)

    def accept_channel(self, peer_id: str, timeout: float = 120.0) -> None:
        """Blocks until prefill worker `peer_id` joins; then its frames land in this worker's KV cache."""
        channel = self._listener.accept(peer_id, self.layout, timeout=timeout)
        kv = self.engine.kv_cache
        endpoint = KVReceiveEndpoint(channel, self.layout, kv.k, kv.v,
                                     [kv.layer_scales(i) for i in range(kv.num_layers)])
        endpoint.start()
        self._thread.submit(lambda: self._endpoints.__setitem__(peer_id, endpoint)).result()

    async def reserve(self, req: ReserveRequest) -> Reservation:
        if req.request_id in self._streams:
            raise ValueError(f"request_id {req.request_id!r} is already active on {self.worker_id}")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(),
                         self._detokenizer(req),
                         len(req.prompt_token_ids))
        reservation = await self._on_engine_thread(lambda: self._reserve(req, stream))
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

    def _close(self) -> None:
        for endpoint in self._endpoints.values():
            endpoint.stop()
        self._listener.close()

    # ---- engine thread ----

    def _reserve(self, req: ReserveRequest, stream: _Stream) -> Reservation:
        prompt = list(req.prompt_token_ids)
        if req.prefill_locally:
            self.engine.add_request(req.request_id, prompt, req.sampling)
            self._active[req.request_id] = stream
            return Reservation(req.request_id, self.worker_id, ())
        block_ids = self.engine.reserve(req.request_id, prompt, req.sampling)
        if block_ids is None:
            raise NoCapacity(f"{self.worker_id}: no room for {len(prompt)} prompt tokens "
                             f"({self.engine.stats().num_free_blocks} free KV blocks)")
        target = TransferTarget(req.request_id, self.worker_id, block_ids, len(prompt))
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
        known = self.engine.abort(request_id)
        stream = self._active.pop(request_id, None)
        if stream is not None:
            stream.push(TokenChunk(request_id, (), stream.flush_text(), FinishReason.ABORT,
                                   stream.num_prompt_tokens, stream.num_output_tokens, error))
        return receiver is not None or known or stream is not None

    def _fail_waiters(self, error: str) -> None:
        for receiver in self._receivers.values():
            receiver.abort("decode worker failed")
        self._receivers.clear()
        for request_id, stream in self._active.items():
            stream.push(TokenChunk(request_id, (), stream.flush_text(), FinishReason.ABORT,
                                   stream.num_prompt_tokens, stream.num_output_tokens, error))
        self._active.clear()

    def _poll_transfers(self) -> bool:
        """Admits requests whose KV has arrived (their first token streams now); fails those whose did not."""
        changed = False
        for request_id, receiver in list(self._receivers.items()):
            state = receiver.poll()
            if state is TransferState.DONE:
                del self._receivers[request_id]
                self.metrics.transfer_received(receiver.bytes_received)
                seq = self.engine.activate(request_id, receiver.first_token_id)
                self._push_tokens(seq, [receiver.first_token_id])
                changed = True
            elif state is TransferState.FAILED:
                reason = receiver.failure_reason or "unknown"
                self.metrics.transfer_failed(reason)
                log.warning("KV transfer for %s failed: %s", request_id, reason)
                self._abort(request_id, reason, error=f"KV transfer failed: {reason}")
                changed = True
        return changed

    def _after_step(self, out: SchedulerOutput, run: RunOutput, finished: list[Sequence]) -> None:
        """Streams each sampled token to its request."""
        for chunk in out.chunks:
            token = run.sampled.get(chunk.seq.request_id)
            if token is not None:
                self._push_tokens(chunk.seq, [token])

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
            self.engine.abort(seq.request_id)
            reason = FinishReason.STOP
        elif reason is not None:
            text += stream.flush_text()
        self.metrics.tokens_generated(len(token_ids))
        stream.push(TokenChunk(seq.request_id, tuple(token_ids), text, reason,
                               seq.num_prompt_tokens, seq.num_output_tokens))
        if reason is not None:
            del self._active[seq.request_id]
