"""Decode worker without Ray: reserve blocks, receive KV, decode in a continuous batch, stream tokens."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import torch

from contracts.sampling import FinishReason
from contracts.stats import WorkerInfo
from contracts.transfer import KV_FAILURE_POLICIES, ChannelAddress, TransferTarget
from decode_worker.api import NoCapacity, Reservation, ReserveRequest, TokenChunk
from decode_worker.metrics import DecodeMetrics
from decode_worker.streams import RequestStream, Subscriber, deliver_all
from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.executor import RunOutput
from engine.model_files import resolve_model_path
from engine.random_models import is_random_model
from engine.scheduler import SchedulerOutput
from engine.sequence import Sequence
from engine.spec.verify import accepted_prefix
from engine.tokenizer import Tokenizer
from engine.worker_shell import WorkerService
from kv_transfer.dist_channel import ChannelListener
from kv_transfer.layout import KVLayout
from kv_transfer.receiver import KVReceiveEndpoint, KVReceiver
from kv_transfer.state import TransferState

log = logging.getLogger(__name__)
T = TypeVar("T")


class DecodeService(WorkerService):
    role = "decode"

    def __init__(self, worker_id: str, config: EngineConfig, host: str = "127.0.0.1",
                 kv_lease_seconds: float = 120.0, progress: bool = False,
                 kv_failure_policy: str = "recompute") -> None:
        if kv_failure_policy not in KV_FAILURE_POLICIES:
            raise ValueError(f"kv_failure_policy must be one of {KV_FAILURE_POLICIES}, "
                             f"got {kv_failure_policy!r}")
        super().__init__(worker_id, config, progress=progress)
        self.kv_failure_policy = kv_failure_policy
        self.incarnation = uuid.uuid4().hex  # this process's listener; peers of an older one reconnect
        # Random-weight models (speed work) have no tokenizer: their streams carry token ids and empty text.
        self.tokenizer = None if is_random_model(config.model_path) else \
            Tokenizer.from_model(resolve_model_path(config.model_path))
        # Whole kv heads on the wire (engine.wire_kv_spec); at TP > 1 they land beside the cache first and
        # are scattered to the ranks when the transfer is done (_admit).
        self.layout = KVLayout(self.engine.wire_kv_spec, self.engine.kv_cache.num_layers)
        self.metrics = DecodeMetrics(worker_id)
        self._lease = kv_lease_seconds
        self._listener = ChannelListener(host=host, port=0, device=config.device)
        self._endpoints: dict[str, KVReceiveEndpoint] = {}
        self._receivers: dict[str, KVReceiver] = {}  # engine thread only
        self._awaiting_kv: dict[str, ReserveRequest] = {}  # engine thread only: what a recompute prefills
        self._joined = False  # a prefill worker has connected at least once
        self._active: dict[str, RequestStream] = {}  # engine thread only
        self._streams: dict[str, RequestStream] = {}  # actor loop only
        self._subscribers: dict[str, Subscriber] = {}  # actor loop only
        # Chunks pushed since the last flush (engine thread only): handed to the actor loop in one callback at
        # the end of each step or command, so a subscriber's next item holds the whole step.
        self._outbox: list[tuple[RequestStream, TokenChunk]] = []
        self.start()

    # ---- control plane (called from the actor's event loop) ----

    def channel_address(self) -> ChannelAddress:
        host, port = self._listener.address
        return ChannelAddress(host=host, port=port, decode_id=self.worker_id, incarnation=self.incarnation)

    def accept_channel(self, peer_id: str, timeout: float = 120.0) -> None:
        """Blocks until prefill worker `peer_id` joins; then its frames land in this worker's KV cache.

        A peer may join again (it restarted, or this worker did and it reconnects): the new channel replaces
        the old one, and reservations still waiting for their first frame listen on it too."""
        channel = self._listener.accept(peer_id, self.layout, timeout=timeout)
        kv = self.engine.kv_cache
        if self.engine.tp_comm is None:
            endpoint = KVReceiveEndpoint(channel, self.layout, kv.k, kv.v,
                                         [kv.layer_scales(i) for i in range(kv.num_layers)])
        else:  # each receiver brings its landing (_reserve)
            endpoint = KVReceiveEndpoint(channel, self.layout, [], [], device=kv.device)
        endpoint.start()
        old = self._thread.submit(lambda: self._add_endpoint(peer_id, endpoint)).result()
        self._joined = True
        if old is not None:
            old.stop()  # its transfers in flight fail (channel_error) and follow the failure policy

    async def info(self) -> WorkerInfo:
        """"starting" until a prefill worker has joined: before that no prompt's KV could reach it."""
        info = await super().info()
        if info.state == "ready" and not self._joined:
            return dataclasses.replace(info, state="starting")
        return info

    async def recompute(self, request_id: str) -> bool:
        """The prompt's KV will not come (its prefill worker failed): prefill it here instead. False if the
        request awaits no KV here (already arrived, finished or unknown)."""
        return await self._on_engine_thread(lambda: self._recompute(request_id, "prefill worker failed"))

    async def reserve(self, req: ReserveRequest) -> Reservation:
        if req.request_id in self._streams:
            raise ValueError(f"request_id {req.request_id!r} is already active on {self.worker_id}")
        stream = RequestStream(asyncio.get_running_loop(), asyncio.Queue(),
                         self._detokenizer(req),
                         len(req.prompt_token_ids))
        reservation = await self._on_engine_thread(lambda: self._reserve(req, stream))
        self._streams[req.request_id] = stream
        return reservation

    def _detokenizer(self, req: ReserveRequest) -> IncrementalDetokenizer | None:
        if self.tokenizer is None:
            return None
        num_prompt = len(req.prompt_token_ids) - req.num_resumed_tokens
        return IncrementalDetokenizer(self.tokenizer, list(req.prompt_token_ids[:num_prompt]),
                                      req.sampling.stop)

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

    async def subscribe(self, subscriber_id: str) -> AsyncIterator[tuple[TokenChunk, ...]]:
        """One long-lived stream of the chunks of every request `attach`ed to `subscriber_id`, batched: each
        item is what arrived since the last one (one decode step's tokens for all its streams). A request
        leaves it with its finishing chunk; if the consumer goes away, its unfinished requests abort."""
        sub = self._subscribers.setdefault(subscriber_id, Subscriber())
        try:
            while True:
                await sub.ready.wait()
                sub.ready.clear()
                batch, sub.pending = tuple(sub.pending), []
                for chunk in batch:
                    if chunk.finish_reason is not None:
                        sub.requests.discard(chunk.request_id)
                        self._streams.pop(chunk.request_id, None)
                yield batch
        finally:
            if self._subscribers.get(subscriber_id) is sub:
                del self._subscribers[subscriber_id]
            for request_id in list(sub.requests):  # consumer went away mid-stream: client disconnect = abort
                self._streams.pop(request_id, None)
                await self.abort(request_id)

    def attach(self, subscriber_id: str, request_id: str) -> None:
        """Route `request_id`'s chunks (those queued so far first) to `subscriber_id`'s stream."""
        stream = self._streams.get(request_id)
        if stream is None or stream.subscriber is not None:
            raise KeyError(f"no reserved, unstreamed request {request_id!r} on {self.worker_id}")
        # Created here too if attach overtakes subscribe; subscribe then takes it over.
        sub = self._subscribers.setdefault(subscriber_id, Subscriber())
        sub.requests.add(request_id)
        stream.subscriber = sub
        while not stream.queue.empty():
            sub.put(stream.queue.get_nowait())

    async def _on_engine_thread(self, fn: Callable[[], T]) -> T:
        def run_and_flush() -> T:
            try:
                return fn()
            finally:
                self._flush()

        return await super()._on_engine_thread(run_and_flush)

    def _close(self) -> None:
        for endpoint in self._endpoints.values():
            endpoint.stop()
        self._listener.close()

    # ---- engine thread ----

    def _step(self) -> bool:
        try:
            return super()._step()
        finally:
            self._flush()

    def _push(self, stream: RequestStream, chunk: TokenChunk) -> None:
        stream.num_output_tokens = chunk.num_output_tokens
        self._outbox.append((stream, chunk))

    def _flush(self) -> None:
        if not self._outbox:
            return
        batch, self._outbox = self._outbox, []
        batch[0][0].loop.call_soon_threadsafe(deliver_all, batch)  # every stream lives on the actor's loop

    def _add_endpoint(self, peer_id: str, endpoint: KVReceiveEndpoint) -> KVReceiveEndpoint | None:
        old = self._endpoints.get(peer_id)
        self._endpoints[peer_id] = endpoint
        for receiver in self._receivers.values():
            if receiver.state in (TransferState.BOOTSTRAPPING, TransferState.WAITING):
                endpoint.register(receiver)
        return old

    def _resume_text(self, req: ReserveRequest, stream: RequestStream) -> None:
        """A migrated request: feed the tokens an earlier worker streamed to the detokenizer, so the text
        continues where it was; the router drops the characters its client already has."""
        if not req.num_resumed_tokens or stream.detok is None:
            return
        text = stream.detok.add(req.prompt_token_ids[-req.num_resumed_tokens:]).text
        if text:
            self._push(stream, TokenChunk(req.request_id, (), text, None, stream.num_prompt_tokens, 0))

    def _reserve(self, req: ReserveRequest, stream: RequestStream) -> Reservation:
        prompt = list(req.prompt_token_ids)
        if req.prefill_locally:
            self.engine.add_request(req.request_id, prompt, req.sampling)
            self._resume_text(req, stream)
            self._active[req.request_id] = stream
            return Reservation(req.request_id, self.worker_id, ())
        block_ids = self.engine.reserve(req.request_id, prompt, req.sampling)
        if block_ids is None:  # name the limit: a full batch and a full cache call for different fixes
            stats = self.engine.stats()
            if stats.num_free_seqs == 0:
                why = f"all {stats.max_num_seqs} sequence slots (max_num_seqs) are taken"
            else:
                need = -(-len(prompt) // self.config.block_size)
                why = f"{need} KV blocks needed, {stats.num_free_blocks} free"
            raise NoCapacity(f"{self.worker_id}: no room for {len(prompt)} prompt tokens: {why}")
        self._resume_text(req, stream)
        target = TransferTarget(req.request_id, self.worker_id, block_ids, len(prompt),
                                start_token=self.engine.reserved_prefix_tokens(req.request_id))
        # on_finish runs on the endpoint thread when the last frame lands: wake the engine to admit it now.
        receiver = KVReceiver(target, self.layout, lease_seconds=self._lease,
                              on_finish=lambda _: self._thread.wake(), landing=self._landing(target))
        # The prefill worker is picked after this returns: listen for the request on every channel.
        for endpoint in self._endpoints.values():
            endpoint.register(receiver)
        self._receivers[req.request_id] = receiver
        self._awaiting_kv[req.request_id] = req
        self._active[req.request_id] = stream
        return Reservation(req.request_id, self.worker_id, target.block_ids, target.start_token)

    def _landing(self, target: TransferTarget) -> list[tuple[torch.Tensor, ...]] | None:
        """TP > 1: whole-head tensors the transfer's blocks land in before they are scattered to the ranks
        (rank 0's cache holds only its kv heads); None at TP=1 (frames land in the cache itself)."""
        if self.engine.tp_comm is None:
            return None
        kv, spec = self.engine.kv_cache, self.layout.spec
        n = target.num_blocks(self.layout)
        values = (n, *spec.storage_block_shape)
        scales = [(n, *shape) for shape in spec.scale_shapes().values()]
        return [(torch.zeros(values, dtype=kv.dtype, device=kv.device),
                 torch.zeros(values, dtype=kv.dtype, device=kv.device),
                 *(torch.zeros(shape, dtype=kv.scales[name][0].dtype, device=kv.device)
                   for name, shape in zip(spec.scale_shapes(), scales, strict=True)))
                for _ in range(kv.num_layers)]

    def _recompute(self, request_id: str, reason: str) -> bool:
        """Turn a reservation awaiting KV into a local prefill; the client's stream stays the same."""
        receiver = self._receivers.pop(request_id, None)
        req = self._awaiting_kv.pop(request_id, None)
        if receiver is None or req is None:
            return False
        receiver.abort(reason)  # from here on no frame of the failed transfer lands in its blocks
        self.engine.abort(request_id)  # frees them; the prefill below allocates and writes its own
        self.engine.add_request(request_id, list(req.prompt_token_ids), req.sampling)
        self.metrics.kv_recomputed()
        log.info("KV for %s recomputed locally: %s", request_id, reason)
        return True

    def _abort(self, request_id: str, reason: str, error: str | None = None) -> bool:
        self._awaiting_kv.pop(request_id, None)
        receiver = self._receivers.pop(request_id, None)
        if receiver is not None:
            receiver.abort(reason)
        known = self.engine.abort(request_id)
        if known:
            self._publish_stats()  # the freed blocks show in info() before the stream's last chunk goes out
        stream = self._active.pop(request_id, None)
        if stream is not None:
            self._push(stream, TokenChunk(request_id, (), stream.flush_text(), FinishReason.ABORT,
                                          stream.num_prompt_tokens, stream.num_output_tokens, error))
        return receiver is not None or known or stream is not None

    def _fail_waiters(self, error: str) -> None:
        for receiver in self._receivers.values():
            receiver.abort("decode worker failed")
        self._receivers.clear()
        self._awaiting_kv.clear()
        for request_id, stream in self._active.items():
            self._push(stream, TokenChunk(request_id, (), stream.flush_text(), FinishReason.ABORT,
                                          stream.num_prompt_tokens, stream.num_output_tokens, error,
                                          worker_failed=True))
        self._active.clear()
        self._flush()  # the engine thread ends here: no step or command flushes after this

    def _transfers_in_flight(self) -> bool:
        return bool(self._receivers)

    def _poll_transfers(self) -> bool:
        """Admits requests whose KV has arrived (their first token streams now); fails those whose did not."""
        changed = admitted = False
        for request_id, receiver in list(self._receivers.items()):
            state = receiver.poll()
            if state is TransferState.DONE:
                del self._receivers[request_id]
                self._awaiting_kv.pop(request_id, None)
                self.metrics.transfer_received(receiver.bytes_received)
                if receiver.landing is not None:  # TP: each rank takes its kv heads of the landed blocks
                    first = receiver.target.first_block(self.layout)
                    self.engine.load_kv(receiver.target.block_ids[first:first + receiver.num_blocks],
                                        receiver.landing)
                # The prefill worker's draft-head features (if it runs the head): speculate from step one.
                seq = self.engine.activate(request_id, receiver.first_token_id, receiver.draft_features)
                self._push_tokens(seq, [receiver.first_token_id])
                admitted = changed = True
            elif state is TransferState.FAILED:
                reason = receiver.failure_reason or "unknown"
                self.metrics.transfer_failed(reason)
                log.warning("KV transfer for %s failed: %s", request_id, reason)
                if self.kv_failure_policy != "recompute" or not self._recompute(request_id, reason):
                    self._abort(request_id, reason, error=f"KV transfer failed: {reason}")
                changed = True
        if admitted:
            # The first tokens leave now, not after the step about to run (a long local prefill step would
            # hold them for its whole length, all of it TTFT); stats first, as after a step.
            self._publish_stats()
            self._flush()
        return changed

    def _after_step(self, out: SchedulerOutput, run: RunOutput, finished: list[Sequence]) -> None:
        """Streams each sampled token to its request, with what its verify step drafted and kept."""
        for chunk in out.chunks:
            if chunk.num_sampled and chunk.seq.request_id in run.sampled:
                appended = chunk.seq.token_ids[chunk.output_start:]  # what postprocess appended
                if not appended:
                    continue
                drafts = chunk.draft_token_ids
                kept = accepted_prefix(drafts, appended) if drafts else 0
                if drafts:
                    self.metrics.verified(len(drafts), kept)
                self._push_tokens(chunk.seq, appended, len(drafts), kept)

    def _push_tokens(self, seq: Sequence, token_ids: list[int], num_drafts: int = 0,
                     num_accepted: int = 0) -> None:
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
        self._push(stream, TokenChunk(seq.request_id, tuple(token_ids), text, reason,
                                      seq.num_prompt_tokens, seq.num_output_tokens,
                                      num_draft_tokens=num_drafts, num_accepted_tokens=num_accepted))
        if reason is not None:
            del self._active[seq.request_id]
