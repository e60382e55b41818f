"""Transfer state machine shared by sender and receiver: states, lease, on_finish exactly once."""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)


class TransferState(enum.Enum):
    BOOTSTRAPPING = "bootstrapping"  # channel / endpoint not attached yet
    WAITING = "waiting"  # ready, nothing moved yet
    TRANSFERRING = "transferring"  # some frames moved
    DONE = "done"  # every layer (k and v) and the FINAL frame moved
    FAILED = "failed"  # see failure_reason

    @property
    def terminal(self) -> bool:
        return self in (TransferState.DONE, TransferState.FAILED)


# Short failure reasons, safe as metric labels; free text goes to failure_detail.
LEASE_EXPIRED = "lease_expired"
CHECKSUM = "checksum"
CHANNEL_ERROR = "channel_error"
PROTOCOL_ERROR = "protocol_error"
SIZE_MISMATCH = "size_mismatch"
PEER_ABORTED = "peer_aborted"
INCOMPLETE = "incomplete"

T = TypeVar("T", bound="TransferLifecycle")


class TransferLifecycle(Generic[T]):
    """State, lease deadline and failure reason behind one lock; terminal states are final.

    Subclasses change state under `self._lock` via `_finish_locked`, then call `_notify_finished()` after
    releasing the lock, so callbacks never run under it.
    """

    def __init__(
        self, lease_seconds: float, on_finish: Callable[[T], None] | None, initial: TransferState
    ) -> None:
        if not lease_seconds > 0:
            raise ValueError(f"lease_seconds must be > 0, got {lease_seconds}")
        self._lock = threading.Lock()
        self._state = initial
        self._on_finish = on_finish
        self._notified = False
        self._notify_lock = threading.Lock()
        self.lease_seconds = lease_seconds
        self.created_at = time.monotonic()
        self.deadline = self.created_at + lease_seconds
        self.failure_reason: str | None = None
        self.failure_detail: str | None = None
        self.first_frame_at: float | None = None  # monotonic time of the first frame sent/received
        self.finished_at: float | None = None  # monotonic time DONE or FAILED was reached

    @property
    def state(self) -> TransferState:
        return self._state

    @property
    def transfer_seconds(self) -> float | None:
        """First frame -> DONE (None unless DONE)."""
        if self._state is not TransferState.DONE or self.first_frame_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.first_frame_at

    def _finish_locked(
        self,
        state: TransferState,
        reason: str | None = None,
        detail: str | None = None,
        at: float | None = None,
    ) -> bool:
        if self._state.terminal:
            return False
        self._state = state
        if state is TransferState.FAILED:
            self.failure_reason, self.failure_detail = reason, detail or reason
        self.finished_at = at if at is not None else time.monotonic()
        return True

    def _lease_expired_locked(self) -> bool:
        if time.monotonic() <= self.deadline:
            return False
        return self._finish_locked(
            TransferState.FAILED,
            LEASE_EXPIRED,
            f"lease of {self.lease_seconds}s expired in state {self._state.value}",
        )

    def _on_terminal(self) -> None:
        """Hook for subclasses (release resources) before on_finish runs."""

    def _notify_finished(self) -> None:
        with self._notify_lock:
            if self._notified:
                return
            self._notified = True
        try:
            self._on_terminal()
        finally:
            if self._on_finish is not None:
                try:
                    self._on_finish(self)  # type: ignore[arg-type]
                except Exception:  # a broken callback must not break the thread that finished the transfer
                    log.exception("on_finish callback of %r raised", self)
