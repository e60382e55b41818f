"""Decode side: KVReceiver (one request's state machine), KVReceiveEndpoint (one channel's frame reader)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import torch

from contracts.transfer import TransferTarget
from kv_transfer.channel import KVChannel
from kv_transfer.errors import ChannelError, FrameError
from kv_transfer.frame import (
    HEADER_WORDS,
    FrameHeader,
    FrameKind,
    decode_header,
    expected_layer_bytes,
    payload_checksum,
    scatter_blocks,
    unpack_tensor,
)
from kv_transfer.layout import KVLayout
from kv_transfer.state import (
    CHANNEL_ERROR,
    CHECKSUM,
    INCOMPLETE,
    PEER_ABORTED,
    PROTOCOL_ERROR,
    SIZE_MISMATCH,
    TransferLifecycle,
    TransferState,
)

log = logging.getLogger(__name__)


class KVReceiver(TransferLifecycle["KVReceiver"]):
    """Decode side of one request: BOOTSTRAPPING (not registered) → WAITING → TRANSFERRING → DONE | FAILED.

    Layer payloads are verified (checksum, sizes) and scattered into the first ceil(num_tokens/block_size) of
    `target.block_ids` under this receiver's lock — or, given `landing` (one (k, v, *scales) tuple per layer,
    `[blocks that travel, *block shape]`), into those tensors, which the caller loads into its cache once
    DONE (a TP decode worker, whose rank-0 cache holds only some kv heads); `abort` takes the same lock, so
    once it returns nothing more is written into those blocks. DONE when every layer and the FINAL frame
    arrived. `on_finish` runs exactly once, in the thread that caused DONE/FAILED (the endpoint's reader, or
    poll/abort's caller).
    """

    def __init__(
        self,
        target: TransferTarget,
        layout: KVLayout,
        lease_seconds: float = 30.0,
        on_finish: Callable[[KVReceiver], None] | None = None,
        landing: Sequence[tuple[torch.Tensor, ...]] | None = None,
    ) -> None:
        super().__init__(lease_seconds, on_finish, TransferState.BOOTSTRAPPING)
        self.target = target
        self.layout = layout
        self.num_blocks = target.num_blocks(layout)  # those that travel, from target.first_block on
        self._first_block = target.first_block(layout)
        if landing is not None:
            if len(landing) != layout.num_layers:
                raise ValueError(f"landing needs one tensor tuple per layer ({layout.num_layers})")
            for i, tensors in enumerate(landing):
                layout.check_cache(tensors[0], f"landing k of layer {i}")
                layout.check_cache(tensors[1], f"landing v of layer {i}")
                layout.check_scales(tuple(tensors[2:]), f"landing scales of layer {i}")
                if tensors[0].shape[0] != self.num_blocks:
                    raise ValueError(f"landing holds {tensors[0].shape[0]} blocks, {self.num_blocks} travel")
        self.landing = landing
        self._dst_ids: dict[torch.device, torch.Tensor] = {}
        self._layers: set[int] = set()
        self._endpoints: list[KVReceiveEndpoint] = []
        self._source: KVReceiveEndpoint | None = None  # the endpoint whose channel carries this transfer
        self.first_token_id: int | None = None
        self.draft_features: torch.Tensor | None = None
        self.bytes_received = 0

    @property
    def request_id(self) -> str:
        return self.target.request_id

    def poll(self) -> TransferState:
        """Current state; FAILED 'lease_expired' if the lease ran out before DONE."""
        with self._lock:
            self._lease_expired_locked()
            state = self._state
        if state.terminal:
            self._notify_finished()
        return state

    def abort(self, reason: str) -> None:
        """FAILED with `reason` (no-op once DONE/FAILED). Frames that arrive later are drained and dropped.

        Once this returns, the blocks may be handed to another request: no scatter of this transfer is
        started after the lock is released, and those already queued on a device stream have finished."""
        with self._lock:
            self._finish_locked(TransferState.FAILED, reason, reason)
            source = self._source
        self._notify_finished()
        if source is not None:
            source.synchronize()

    # ---- called by endpoints ----

    def _attach(self, endpoint: KVReceiveEndpoint) -> bool:
        with self._lock:
            if self._state.terminal:
                return False
            self._endpoints.append(endpoint)
            if self._state is TransferState.BOOTSTRAPPING:
                self._state = TransferState.WAITING
            return True

    def _detach_source(self, endpoint: KVReceiveEndpoint, reason: str, detail: str) -> None:
        """The endpoint's channel died: fail only if this transfer was running over it."""
        with self._lock:
            finished = self._source is endpoint and self._finish_locked(TransferState.FAILED, reason, detail)
        if finished:
            self._notify_finished()

    def _on_frame(
        self, endpoint: KVReceiveEndpoint, header: FrameHeader, checksum: int, payload: torch.Tensor | None
    ) -> bool:
        """Apply one frame; False if it was dropped (receiver already finished)."""
        with self._lock:
            if self._state.terminal:
                return False
            if self._source is None:
                self._source = endpoint
                self.first_frame_at = time.monotonic()
            if self._source is not endpoint:
                self._finish_locked(TransferState.FAILED, PROTOCOL_ERROR, "frames arrived on two channels")
            elif payload is not None and int(payload_checksum(payload)) != checksum:
                self._finish_locked(
                    TransferState.FAILED,
                    CHECKSUM,
                    f"{header.kind.name} frame (layer {header.layer}) failed its checksum",
                )
            elif header.kind is FrameKind.LAYER:
                self._apply_layer_locked(endpoint, header, payload)
            elif header.kind is FrameKind.FINAL:
                self._apply_final_locked(endpoint, header, payload)
            else:
                reason = (
                    bytes(payload.cpu().tolist()).rstrip(b"\0").decode(errors="replace")
                    if payload is not None
                    else ""
                )
                self._finish_locked(TransferState.FAILED, PEER_ABORTED, f"prefill side aborted: {reason}")
            finished = self._state.terminal
        if finished:
            self._notify_finished()
        return True

    def _apply_layer_locked(
        self, endpoint: KVReceiveEndpoint, header: FrameHeader, payload: torch.Tensor | None
    ) -> None:
        layer = header.layer
        if not 0 <= layer < self.layout.num_layers or layer in self._layers:
            self._finish_locked(TransferState.FAILED, PROTOCOL_ERROR, f"unexpected or repeated layer {layer}")
            return
        tensors = endpoint.layer_tensors(layer) if self.landing is None else self.landing[layer]
        if tensors is None:
            self._finish_locked(TransferState.FAILED, PROTOCOL_ERROR, "no landing for KV on this endpoint")
            return
        expected = expected_layer_bytes(tensors, self.num_blocks)
        if payload is None or header.num_blocks != self.num_blocks or header.payload_bytes != expected:
            self._finish_locked(
                TransferState.FAILED,
                SIZE_MISMATCH,
                f"layer {layer}: got {header.num_blocks} blocks / {header.payload_bytes} bytes, "
                f"expected {self.num_blocks} blocks / {expected} bytes",
            )
            return
        if self.landing is None:
            ids = self._block_ids_on(payload.device)
        else:  # the landing holds exactly the blocks that travel, in order
            ids = torch.arange(self.num_blocks, device=payload.device)
        scatter_blocks(payload, tensors, ids)
        self._layers.add(layer)
        self.bytes_received += header.payload_bytes
        self._state = TransferState.TRANSFERRING

    def _apply_final_locked(
        self, endpoint: KVReceiveEndpoint, header: FrameHeader, payload: torch.Tensor | None
    ) -> None:
        missing = sorted(set(range(self.layout.num_layers)) - self._layers)
        if missing:
            self._finish_locked(
                TransferState.FAILED, INCOMPLETE, f"FINAL arrived with layers {missing} missing"
            )
            return
        try:
            if header.aux_dtype is not None and payload is not None:
                self.draft_features = unpack_tensor(payload, header.aux_dtype, header.aux_shape)
        except FrameError as e:
            self._finish_locked(TransferState.FAILED, SIZE_MISMATCH, str(e))
            return
        if payload is not None:
            self.bytes_received += header.payload_bytes
        self.first_token_id = header.token
        endpoint.synchronize()  # the scatters must have landed before anyone reads the blocks
        self._finish_locked(TransferState.DONE)

    def _block_ids_on(self, device: torch.device) -> torch.Tensor:
        ids = self._dst_ids.get(device)
        if ids is None:
            blocks = self.target.block_ids[self._first_block:self._first_block + self.num_blocks]
            ids = torch.tensor(blocks, dtype=torch.long, device=device)
            self._dst_ids[device] = ids
        return ids

    def _on_terminal(self) -> None:
        with self._lock:
            endpoints, self._endpoints = self._endpoints, []
        for endpoint in endpoints:
            endpoint._unregister(self)

    def __repr__(self) -> str:
        return f"KVReceiver({self.request_id!r}, {self._state.value}, bytes_received={self.bytes_received})"


class KVReceiveEndpoint:
    """Reads frames from one channel on a thread and hands each to the registered receiver of its request id.

    Frames for unknown or finished requests are drained and dropped (`frames_dropped`), never scattered.
    If the channel breaks, the receivers whose transfer ran over it fail ('channel_error'); the others stay
    registered elsewhere (a receiver may be registered on several endpoints until one channel delivers).
    """

    def __init__(
        self,
        channel: KVChannel,
        layout: KVLayout,
        k_caches: list[torch.Tensor],
        v_caches: list[torch.Tensor],
        extra_caches: Sequence[Sequence[torch.Tensor]] = (),
        device: torch.device | str | None = None,
    ) -> None:
        """No caches (empty lists, `device` given): every receiver registered here brings its `landing`."""
        self.channel = channel
        self.layout = layout
        self._tensors: list[tuple[torch.Tensor, ...]] | None = None
        if not k_caches and not v_caches and device is not None:
            self.device = torch.device(device)
        else:
            self._tensors = self._check_caches(layout, k_caches, v_caches, extra_caches)
            self.device = k_caches[0].device
        self._receivers: dict[str, KVReceiver] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.alive = True
        self.frames_received = 0
        self.frames_dropped = 0
        self.error: str | None = None

    @staticmethod
    def _check_caches(
        layout: KVLayout,
        k_caches: list[torch.Tensor],
        v_caches: list[torch.Tensor],
        extra_caches: Sequence[Sequence[torch.Tensor]],
    ) -> list[tuple[torch.Tensor, ...]]:
        if len(k_caches) != layout.num_layers or len(v_caches) != layout.num_layers:
            raise ValueError(
                f"need {layout.num_layers} k and v caches, got {len(k_caches)} and {len(v_caches)}"
            )
        if extra_caches and len(extra_caches) != layout.num_layers:
            raise ValueError(
                f"extra_caches needs one entry per layer ({layout.num_layers}), got {len(extra_caches)}"
            )
        for i, (k, v) in enumerate(zip(k_caches, v_caches, strict=True)):
            layout.check_cache(k, f"k cache of layer {i}")
            layout.check_cache(v, f"v cache of layer {i}")
            layout.check_scales(tuple(extra_caches[i]) if extra_caches else (), f"scales of layer {i}")
        return [
            (k, v, *(extra_caches[i] if extra_caches else ()))
            for i, (k, v) in enumerate(zip(k_caches, v_caches, strict=True))
        ]

    def layer_tensors(self, layer: int) -> tuple[torch.Tensor, ...] | None:
        """The cache tensors frames of `layer` land in; None if receivers bring their own landing."""
        return None if self._tensors is None else self._tensors[layer]

    def register(self, receiver: KVReceiver) -> None:
        """Route frames of `receiver.request_id` to it. Call before the prefill side starts sending, from the
        thread that runs the engine: its blocks land only after the work that thread's stream has queued."""
        if self._stream is not None:
            # The blocks were just reserved; a decode step still in flight may write them (they were freed
            # while it ran: decode lookahead). Scatters queued from now on wait for it.
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
        if not self.alive:
            log.warning(
                "register(%s) on a dead KV endpoint (%s): its channel cannot deliver",
                receiver.request_id,
                self.error,
            )
            return
        with self._lock:
            current = self._receivers.get(receiver.request_id)
            if current is not None and current is not receiver and not current.state.terminal:
                raise ValueError(
                    f"request {receiver.request_id!r} already has a live receiver on this endpoint"
                )
            self._receivers[receiver.request_id] = receiver
        if not receiver._attach(self):
            self._unregister(receiver)

    def _unregister(self, receiver: KVReceiver) -> None:
        with self._lock:
            if self._receivers.get(receiver.request_id) is receiver:
                del self._receivers[receiver.request_id]

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("KVReceiveEndpoint already started")
        self._thread = threading.Thread(target=self._run, name="kv-receive-endpoint", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop reading and close the channel; pending reads fail at once, so the thread exits."""
        self._stopping.set()
        self.channel.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self.alive = False
        # Transfers running over this channel cannot finish now: fail them (the others stay registered on
        # the endpoints that remain) instead of leaving them to their lease.
        self._fail_receivers(CHANNEL_ERROR, "KV channel closed")

    def synchronize(self) -> None:
        """Wait until this endpoint's device work (scatters) finished; a no-op on CPU."""
        if self._stream is not None:
            self._stream.synchronize()

    @contextlib.contextmanager
    def _device_stream(self) -> Iterator[None]:
        # On CUDA, scatters run on the endpoint's own stream, so they never queue behind the engine's kernels.
        if self._stream is None:
            yield
        else:
            with torch.cuda.stream(self._stream):
                yield

    def _run(self) -> None:
        with self._device_stream():
            try:
                while not self._stopping.is_set():
                    self._read_one()
            except ChannelError as e:
                if not self._stopping.is_set():
                    self._die(CHANNEL_ERROR, f"channel failed: {e}")
            except FrameError as e:  # the byte stream is desynced: nothing after this can be trusted
                self._die(PROTOCOL_ERROR, f"bad frame: {e}")
                self.channel.close()
            except Exception as e:  # never leave receivers hanging on a crashed reader
                log.exception("KV receive endpoint crashed")
                self._die(CHANNEL_ERROR, f"endpoint crashed: {e!r}")
        self.alive = False

    def _read_one(self) -> None:
        header_buf = torch.empty(HEADER_WORDS, dtype=torch.int64, device=self.device)
        self.channel.recv(header_buf).wait()
        header, checksum = decode_header(header_buf)
        payload = None
        if header.payload_bytes:
            payload = torch.empty(header.payload_bytes, dtype=torch.uint8, device=self.device)
            self.channel.recv(payload).wait()  # drained even if dropped: the next frame starts right after it
        self.frames_received += 1
        if self._stopping.is_set():
            return
        with self._lock:
            receiver = self._receivers.get(header.request_id)
        if receiver is None or not receiver._on_frame(self, header, checksum, payload):
            self.frames_dropped += 1

    def _die(self, reason: str, detail: str) -> None:
        self.alive = False
        self.error = detail
        log.warning("KV receive endpoint stopped: %s", detail)
        self._fail_receivers(reason, detail)

    def _fail_receivers(self, reason: str, detail: str) -> None:
        with self._lock:
            receivers = list(self._receivers.values())
        # Receivers mid-transfer over this channel fail; the others may still be served by another channel.
        for receiver in receivers:
            receiver._detach_source(self, reason, detail)
            self._unregister(receiver)
