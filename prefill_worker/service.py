"""Prefill worker logic without Ray: chunked prefill under a token budget, KV streamed layer by layer."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from contracts.stats import WorkerInfo
from contracts.transfer import ChannelAddress
from engine.config import EngineConfig
from engine.executor import RunOutput
from engine.scheduler import SchedulerOutput
from engine.sequence import Sequence
from engine.worker_shell import WorkerService
from kv_transfer.channel import KVChannel
from kv_transfer.dist_channel import connect_channel
from kv_transfer.layout import KVLayout
from kv_transfer.sender import KVSender
from kv_transfer.state import TransferState
from prefill_worker.api import PrefillFailed, PrefillRequest, PrefillResult
from prefill_worker.metrics import PrefillMetrics

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    """One prompt between arrival and its last KV byte leaving."""

    request: PrefillRequest
    sender: KVSender
    result: Future
    arrived: float
    started: float | None = None  # first chunk scheduled
    computed: float | None = None  # last layer of the final chunk computed
    first_send: float | None = None  # layer 0 of the final chunk handed to the sender
    first_token_id: int | None = None


class PrefillService(WorkerService):
    role = "prefill"

    def __init__(self, worker_id: str, config: EngineConfig, kv_lease_seconds: float = 120.0,
                 progress: bool = False, stream_layers: bool = True) -> None:
        """`stream_layers=False` is the baseline the layer-wise design is measured against: the same sends,
        all issued once the forward pass has ended instead of from each layer's hook."""
        super().__init__(worker_id, config, progress=progress)
        self.stream_layers = stream_layers
        # Whole kv heads on the wire, whatever this worker's TP size (a decode worker of another size maps
        # them onto its own ranks): engine.wire_kv_spec.
        self.layout = KVLayout(self.engine.wire_kv_spec, self.engine.kv_cache.num_layers)
        self.metrics = PrefillMetrics(worker_id, self.layout.dtype)
        self._lease = kv_lease_seconds
        self._channels: dict[str, KVChannel] = {}  # decode_id -> channel
        self._peers: dict[str, str] = {}  # decode_id -> the incarnation its channel was opened to
        self.incarnation = uuid.uuid4().hex
        self._pending: dict[str, _Pending] = {}  # engine thread only
        self.start()

    # ---- control plane ----

    def connect_channel(self, address: ChannelAddress, timeout: float = 120.0) -> None:
        """Join decode worker `address.decode_id`; a channel to an older incarnation of it is replaced."""
        channel = connect_channel(address.host, address.port, self.worker_id, self.layout,
                                  device=self.config.device, timeout=timeout)
        old = self._thread.submit(lambda: self._swap_channel(address.decode_id, channel)).result()
        self._peers[address.decode_id] = address.incarnation
        if old is not None:
            old.close()  # sends still on it fail; their requests follow the decode side's failure policy

    def channel_peers(self) -> tuple[str, dict[str, str]]:
        """This process's incarnation, and decode_id -> incarnation of every decode worker it has a channel
        to: the supervisor's view of who must (re)join whom."""
        return self.incarnation, dict(self._peers)

    async def info(self) -> WorkerInfo:
        """"starting" until it has a KV channel: before that it could prefill but send nowhere."""
        info = await super().info()
        if info.state == "ready" and not self._peers:
            return dataclasses.replace(info, state="starting")
        return info

    async def prefill(self, req: PrefillRequest) -> PrefillResult:
        result: Future = Future()
        await self._on_engine_thread(lambda: self._add(req, result))
        try:
            return await asyncio.wrap_future(result)
        except asyncio.CancelledError:  # caller gave up: stop computing and sending
            await self.abort(req.request_id)
            raise

    def _close(self) -> None:
        for channel in self._channels.values():
            channel.close()

    # ---- engine thread ----

    def _swap_channel(self, decode_id: str, channel: KVChannel) -> KVChannel | None:
        old = self._channels.get(decode_id)
        self._channels[decode_id] = channel
        return old

    def _idle_poll_s(self) -> float:
        # Send completion is polled (gloo/NCCL handles have no callback): poll fast while sends are in flight.
        return 0.0002 if self._pending else super()._idle_poll_s()

    def _transfers_in_flight(self) -> bool:
        return bool(self._pending)

    def _add(self, req: PrefillRequest, result: Future) -> None:
        channel = self._channels.get(req.target.decode_id)
        if channel is None:
            raise PrefillFailed(f"{self.worker_id} has no KV channel to decode worker "
                                f"{req.target.decode_id!r}")
        if req.request_id in self._pending:
            raise PrefillFailed(f"request_id {req.request_id!r} is already being prefilled "
                                f"on {self.worker_id}")
        # The prefill side samples exactly one token (the first); the decode side samples the rest.
        self.engine.add_request(req.request_id, list(req.prompt_token_ids),
                                dataclasses.replace(req.sampling, max_tokens=1))
        sender = KVSender(req.target, self.layout, channel, lease_seconds=self._lease)
        self._pending[req.request_id] = _Pending(req, sender, result, arrived=time.perf_counter())

    def _abort(self, request_id: str, reason: str) -> bool:
        pending = self._pending.pop(request_id, None)
        known = self.engine.abort(request_id)
        if pending is not None:
            pending.sender.abort(reason)
            if not pending.result.done():
                pending.result.set_exception(PrefillFailed(f"{request_id}: {reason}"))
        return pending is not None or known

    def _fail_waiters(self, error: str) -> None:
        for request_id, pending in self._pending.items():
            pending.sender.abort("prefill worker failed")  # the decode side frees its reservation
            if not pending.result.done():
                pending.result.set_exception(PrefillFailed(f"{request_id}: {error}"))
        self._pending.clear()

    def _execute(self, out: SchedulerOutput) -> RunOutput:
        """Runs the chunks, streaming each finished prompt's KV per layer; then queues its first token."""
        now = time.perf_counter()
        completing: list[tuple[Sequence, _Pending]] = []
        for chunk in out.chunks:
            pending = self._pending.get(chunk.seq.request_id)
            if pending is None:
                continue
            if pending.started is None:
                pending.started = now
            if chunk.num_sampled:
                completing.append((chunk.seq, pending))
        send = self._run_sending if self.engine.tp_comm is None else self._run_sending_gathered
        run, computed = send(out, completing)
        for seq, pending in completing:
            (token,) = run.sampled[seq.request_id]  # a prompt's end samples exactly one token
            # The draft head's fused feature of the last prompt position (None unless this worker runs the
            # head): the decode worker's head drafts from it before its first step.
            pending.sender.send_final(token, self.engine.draft_features(seq.request_id))
            pending.first_token_id, pending.computed = token, computed
        # postprocess frees the blocks of finished prompts right after this: send_layer already copied them.
        return run

    def _run_sending(self, out: SchedulerOutput,
                     completing: list[tuple[Sequence, _Pending]]) -> tuple[RunOutput, float]:
        """TP=1: each layer's KV goes from the cache straight to the senders. Returns the run and when its
        compute ended (before any after-prefill sends: the TTFT split counts those as exposed transfer)."""
        kv = self.engine.kv_cache

        def send_layer(layer: int) -> None:  # runs right after layer `layer` stored its KV
            for seq, pending in completing:
                if pending.first_send is None:
                    pending.first_send = time.perf_counter()
                pending.sender.send_layer(layer, kv.k[layer], kv.v[layer], seq.block_table,
                                          kv.layer_scales(layer))

        run = self.engine.execute(out, layer_hook=send_layer if completing and self.stream_layers else None)
        computed = time.perf_counter()
        if completing and not self.stream_layers:
            for layer in range(self.layout.num_layers):
                send_layer(layer)
        return run, computed

    def _run_sending_gathered(self, out: SchedulerOutput,
                              completing: list[tuple[Sequence, _Pending]]) -> tuple[RunOutput, float]:
        """TP > 1: at each layer rank 0 gathers the ranks' kv-head shards of the finished prompts' blocks
        (every rank must take part, so the gather always runs in the layer hook) and sends whole heads."""
        if not completing:
            return self.engine.execute(out), time.perf_counter()
        exported: list[int] = []
        rows: list[list[int]] = []  # per prompt: where its blocks sit among the gathered ones
        for seq, pending in completing:
            blocks = seq.block_table[:pending.sender.first_block + pending.sender.num_blocks]
            rows.append(list(range(len(exported), len(exported) + len(blocks))))
            exported += blocks
        ids = torch.tensor(exported, dtype=torch.long, device=self.engine.kv_cache.device)
        gathered: list[tuple[torch.Tensor, ...]] = []

        def send_layer(layer: int, whole: tuple[torch.Tensor, ...]) -> None:
            for (_, pending), row in zip(completing, rows, strict=True):
                if pending.first_send is None:
                    pending.first_send = time.perf_counter()
                pending.sender.send_layer(layer, whole[0], whole[1], row, whole[2:])

        def gather_layer(layer: int) -> None:
            whole = self.engine.export_layer(layer, ids)
            if self.stream_layers:
                send_layer(layer, whole)
            else:
                gathered.append(whole)

        run = self.engine.execute(out, layer_hook=gather_layer, export_blocks=exported)
        computed = time.perf_counter()
        for layer, whole in enumerate(gathered):
            send_layer(layer, whole)
        return run, computed

    def _after_step(self, out: SchedulerOutput, run: RunOutput, finished: list[Sequence]) -> None:
        self._poll_transfers()

    def _poll_transfers(self) -> bool:
        changed = False
        for request_id, pending in list(self._pending.items()):
            state = pending.sender.poll()
            if state is TransferState.DONE:
                del self._pending[request_id]
                self._finish(pending)
                changed = True
            elif state is TransferState.FAILED:
                del self._pending[request_id]
                self.engine.abort(request_id)
                reason = pending.sender.failure_reason or "unknown"
                self.metrics.transfer_failed(reason)
                if not pending.result.done():
                    pending.result.set_exception(
                        PrefillFailed(f"KV transfer of {request_id} failed: {reason}"))
                changed = True
        return changed

    def _finish(self, pending: _Pending) -> None:
        done = time.perf_counter()
        started = pending.started if pending.started is not None else pending.arrived
        computed = pending.computed if pending.computed is not None else done
        result = PrefillResult(
            request_id=pending.request.request_id,
            first_token_id=int(pending.first_token_id) if pending.first_token_id is not None else -1,
            queue_seconds=started - pending.arrived,
            prefill_seconds=computed - started,
            transfer_exposed_seconds=done - computed,
        )
        first_send = pending.first_send if pending.first_send is not None else computed
        self.metrics.transfer_done(pending.sender.bytes_sent, done - first_send,
                                   result.transfer_exposed_seconds)
        self.metrics.prefill_done(len(pending.request.prompt_token_ids))
        if not pending.result.done():
            pending.result.set_result(result)
