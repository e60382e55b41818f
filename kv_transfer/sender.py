"""KVSender: streams one request's KV, layer by layer, into the blocks its decode worker reserved."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch

from contracts.transfer import TransferTarget
from kv_transfer.channel import KVChannel, TransferHandle
from kv_transfer.errors import ChannelError, KVTransferError
from kv_transfer.frame import (
    FrameHeader,
    FrameKind,
    encode_header,
    gather_blocks,
    pack_bytes,
    pack_tensor,
    payload_checksum,
)
from kv_transfer.layout import KVLayout
from kv_transfer.state import CHANNEL_ERROR, TransferLifecycle, TransferState

log = logging.getLogger(__name__)


class KVSender(TransferLifecycle["KVSender"]):
    """Prefill side of one request. BOOTSTRAPPING (no channel) → WAITING → TRANSFERRING → DONE | FAILED.

    `send_layer` gathers (copies) this request's blocks, so the caller may free or overwrite them right after
    it returns. Transport problems never raise out of `send_layer`/`send_final`: they turn the sender FAILED.
    `poll()` advances the state (send completions, lease); `abort()` works in every state and is idempotent;
    `on_finish` runs exactly once, on DONE or FAILED, in the thread that caused it.
    """

    def __init__(
        self,
        target: TransferTarget,
        layout: KVLayout,
        channel: KVChannel | None,
        lease_seconds: float = 30.0,
        on_finish: Callable[[KVSender], None] | None = None,
    ) -> None:
        super().__init__(
            lease_seconds,
            on_finish,
            TransferState.WAITING if channel is not None else TransferState.BOOTSTRAPPING,
        )
        self.target = target
        self.layout = layout
        self.num_blocks = target.num_blocks(layout)  # those that travel, from first_block on
        self.first_block = target.first_block(layout)
        self._channel = channel
        self._layers_sent: set[int] = set()
        self._final_sent = False
        self._pending: list[TransferHandle] = []
        self._last_completion: float | None = None
        self.bytes_sent = 0  # payload bytes handed to the channel (KV, scales, draft features)

    def attach(self, channel: KVChannel) -> None:
        """Give a BOOTSTRAPPING sender its channel (BOOTSTRAPPING → WAITING)."""
        with self._lock:
            if self._state is TransferState.BOOTSTRAPPING:
                self._channel = channel
                self._state = TransferState.WAITING

    def send_layer(
        self,
        layer: int,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        src_block_ids: Sequence[int],
        extra: Sequence[torch.Tensor] = (),
    ) -> None:
        """Copy `k_cache[src_block_ids]`, `v_cache[...]` and `extra[i][...]` (the layout's scale tensors, in
        `layout.scale_names()` order) of the blocks that travel (first_block on, up to
        ceil(num_tokens/block_size)), checksum, issue an async send."""
        if not 0 <= layer < self.layout.num_layers:
            raise ValueError(f"layer {layer} out of range [0, {self.layout.num_layers})")
        self.layout.check_cache(k_cache, f"k cache of layer {layer}")
        self.layout.check_cache(v_cache, f"v cache of layer {layer}")
        self.layout.check_scales(tuple(extra), f"scales of layer {layer}")
        end = self.first_block + self.num_blocks
        if len(src_block_ids) < end:
            raise ValueError(
                f"{self.target.request_id}: {self.target.num_tokens} tokens need {end} "
                f"source blocks, got {len(src_block_ids)}"
            )
        with self._lock:
            if self._state.terminal:
                return  # aborted or failed: the batch it was computed in goes on, its KV goes nowhere
            if self._state is TransferState.BOOTSTRAPPING or self._channel is None:
                raise KVTransferError(f"{self.target.request_id}: send_layer before a channel was attached")
            if layer in self._layers_sent or self._final_sent:
                raise ValueError(f"{self.target.request_id}: layer {layer} sent twice or after send_final")
            tensors = (k_cache, v_cache, *extra)
            ids = torch.tensor(
                list(src_block_ids[self.first_block:end]), dtype=torch.long, device=k_cache.device
            )
            payload = gather_blocks(tensors, ids)
            kv_bytes = 2 * self.num_blocks * self.layout.block_bytes()
            header = FrameHeader(
                FrameKind.LAYER,
                self.target.request_id,
                layer=layer,
                payload_bytes=payload.numel(),
                num_blocks=self.num_blocks,
                scale_bytes=payload.numel() - kv_bytes if extra else 0,
            )
            if self._issue_locked(header, payload):
                self._layers_sent.add(layer)
        self._notify_if_failed()

    def send_final(self, first_token_id: int, draft_features: torch.Tensor | None = None) -> None:
        """After the last layer: the first sampled token and (optionally) the draft head's input features."""
        with self._lock:
            if self._state.terminal:
                return
            if self._channel is None:
                raise KVTransferError(f"{self.target.request_id}: send_final before a channel was attached")
            missing = sorted(set(range(self.layout.num_layers)) - self._layers_sent)
            if missing or self._final_sent:
                raise ValueError(
                    f"{self.target.request_id}: send_final with layers {missing} unsent or called twice"
                )
            payload = pack_tensor(draft_features) if draft_features is not None else None
            header = FrameHeader(
                FrameKind.FINAL,
                self.target.request_id,
                token=int(first_token_id),
                payload_bytes=0 if payload is None else payload.numel(),
                aux_dtype=None if draft_features is None else draft_features.dtype,
                aux_shape=() if draft_features is None else tuple(draft_features.shape),
            )
            if self._issue_locked(header, payload):
                self._final_sent = True
        self._notify_if_failed()

    def poll(self) -> TransferState:
        """Collect send completions: DONE once FINAL and all sends completed; FAILED on error or expiry."""
        failed_by_lease = False
        with self._lock:
            if not self._state.terminal:
                still = []
                for handle in self._pending:
                    if not handle.is_completed():
                        still.append(handle)
                        continue
                    try:
                        handle.wait(0)
                    except ChannelError as e:
                        self._finish_locked(TransferState.FAILED, CHANNEL_ERROR, str(e))
                        break
                    if handle.completed_at is not None:
                        self._last_completion = max(self._last_completion or 0.0, handle.completed_at)
                self._pending = still
                if not self._state.terminal and self._final_sent and not self._pending:
                    self._finish_locked(TransferState.DONE, at=self._last_completion)
                elif not self._state.terminal and self._lease_expired_locked():
                    failed_by_lease = True
                    self._send_abort_locked(self.failure_detail or "lease expired")
            state = self._state
        if state.terminal:
            self._notify_finished()
        if failed_by_lease:
            log.warning("KV send of %s: lease of %ss expired", self.target.request_id, self.lease_seconds)
        return state

    def abort(self, reason: str) -> None:
        """FAILED with `reason` (no-op once DONE/FAILED); tells the receiver by an ABORT frame when it can."""
        with self._lock:
            if self._state.terminal:
                return
            self._send_abort_locked(reason)
            self._finish_locked(TransferState.FAILED, reason, reason)
        self._notify_finished()

    # ---- internals ----

    def _issue_locked(self, header: FrameHeader, payload: torch.Tensor | None) -> bool:
        """Send header (+ payload) as one frame; False (and FAILED) if the channel refused it."""
        channel = self._channel
        if channel is None:
            raise KVTransferError(f"{self.target.request_id}: no channel attached")
        checksum = payload_checksum(payload) if payload is not None and payload.numel() else None
        tensors = [encode_header(header, checksum, channel.device)]
        if payload is not None and payload.numel():
            tensors.append(payload)
        try:
            handles = channel.send_many(tensors)
        except ChannelError as e:
            self._finish_locked(TransferState.FAILED, CHANNEL_ERROR, str(e))
            return False
        if self.first_frame_at is None:
            self.first_frame_at = time.monotonic()
        self._pending.extend(handles)
        self.bytes_sent += header.payload_bytes
        if self._state is TransferState.WAITING:
            self._state = TransferState.TRANSFERRING
        return True

    def _send_abort_locked(self, reason: str) -> None:
        channel = self._channel
        if channel is None or channel.closed:
            return
        payload = pack_bytes(reason.encode()[:4096], channel.device)
        header = FrameHeader(FrameKind.ABORT, self.target.request_id, payload_bytes=payload.numel())
        checksum = payload_checksum(payload) if payload.numel() else None
        frame = [encode_header(header, checksum, channel.device)] + ([payload] if payload.numel() else [])
        try:  # best effort: the receiver's lease covers a lost ABORT
            channel.send_many(frame)
        except ChannelError as e:
            log.info("ABORT frame for %s not sent: %s", self.target.request_id, e)

    def _notify_if_failed(self) -> None:
        if self._state.terminal:
            self._notify_finished()

    def __repr__(self) -> str:
        return f"KVSender({self.target.request_id!r}, {self._state.value}, bytes_sent={self.bytes_sent})"
