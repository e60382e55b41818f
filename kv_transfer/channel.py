"""KVChannel: an ordered, reliable point-to-point tensor pipe between one prefill and one decode worker."""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence

import torch

from kv_transfer.errors import ChannelClosed, ChannelError, ChannelTimeout


class TransferHandle:
    """Completion of one send or recv: the bytes left (send) or landed (recv), or the op failed."""

    def __init__(self, description: str = "transfer") -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self.description = description
        self.completed_at: float | None = None  # time.monotonic() when it completed (metrics)

    def is_completed(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> None:
        """Block until completed; ChannelTimeout if `timeout` passes first, ChannelError if the op failed."""
        if not self._event.wait(timeout):
            raise ChannelTimeout(f"{self.description} not completed within {timeout}s")
        if self._error is not None:
            if isinstance(self._error, ChannelError):
                raise self._error
            raise ChannelError(f"{self.description} failed: {self._error}") from self._error

    def _complete(self, error: BaseException | None = None) -> bool:
        """Mark done (first call wins: a close that failed the handle is not undone by a late completion)."""
        with self._lock:
            if self._event.is_set():
                return False
            self._error = error
            self.completed_at = time.monotonic()
            self._event.set()
            return True


class KVChannel(ABC):
    """Ordered and reliable: tensors sent on one end arrive, in order, at the matching recvs of the other end.

    A recv's tensor must have exactly as many bytes as the matching send's. Tensors must be contiguous and on
    the channel's device. `send` and `recv` return at once; the handle says when the op completed. `close`
    fails every pending handle with ChannelClosed, so no thread stays blocked on this side.
    """

    def __init__(self) -> None:
        self._send_lock = threading.Lock()

    @abstractmethod
    def send(self, t: torch.Tensor) -> TransferHandle: ...

    @abstractmethod
    def recv(self, t: torch.Tensor) -> TransferHandle: ...

    @abstractmethod
    def close(self) -> None: ...

    @property
    def closed(self) -> bool:
        return False

    @property
    def device(self) -> torch.device:
        """Where the tensors this channel moves must live."""
        return torch.device("cpu")

    def send_many(self, tensors: Sequence[torch.Tensor]) -> list[TransferHandle]:
        """Issue sends back to back with no other thread's send between them (a frame stays whole)."""
        with self._send_lock:
            return [self.send(t) for t in tensors]


def check_contiguous(t: torch.Tensor) -> None:
    """Every channel moves a tensor's storage as is: one contiguous run of bytes."""
    if not t.is_contiguous():
        raise ValueError("KVChannel moves contiguous tensors only")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _LoopbackPipe:
    """One direction of a loopback pair: buffered sends waiting for recvs, or recvs waiting for sends."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent: deque[torch.Tensor] = deque()
        self.waiting: deque[tuple[torch.Tensor, TransferHandle]] = deque()
        self.closed = False


def _settle(t: torch.Tensor) -> torch.Tensor:
    # Sender and receiver threads use different CUDA streams; a test channel simply waits for the copy.
    if t.is_cuda:
        torch.cuda.current_stream(t.device).synchronize()
    return t


def _deliver(data: torch.Tensor, dst: torch.Tensor, handle: TransferHandle) -> None:
    if _nbytes(data) != _nbytes(dst):
        handle._complete(
            ChannelError(f"recv of {_nbytes(dst)} bytes matched a send of {_nbytes(data)} bytes")
        )
        return
    if _nbytes(dst):
        dst.view(-1).view(torch.uint8).copy_(data.view(-1).view(torch.uint8))
        _settle(dst)
    handle._complete()


class LoopbackChannel(KVChannel):
    """In-process channel for tests: a send copies the tensor, so the sender may reuse its buffer at once."""

    def __init__(
        self, outbox: _LoopbackPipe, inbox: _LoopbackPipe, device: torch.device | str = "cpu"
    ) -> None:
        super().__init__()
        self._outbox, self._inbox = outbox, inbox
        self._device = torch.device(device)
        self._closed = False

    @staticmethod
    def pair(device: torch.device | str = "cpu") -> tuple[KVChannel, KVChannel]:
        a_to_b, b_to_a = _LoopbackPipe(), _LoopbackPipe()
        return LoopbackChannel(a_to_b, b_to_a, device), LoopbackChannel(b_to_a, a_to_b, device)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def device(self) -> torch.device:
        return self._device

    def send(self, t: torch.Tensor) -> TransferHandle:
        handle = self._open("send", t)
        pipe = self._outbox
        with pipe.lock:
            if pipe.closed:
                handle._complete(ChannelClosed("peer closed the channel"))
                return handle
            if pipe.waiting:
                dst, recv_handle = pipe.waiting.popleft()
                _deliver(t, dst, recv_handle)
            else:
                pipe.sent.append(_settle(t.detach().clone()))
        handle._complete()
        return handle

    def recv(self, t: torch.Tensor) -> TransferHandle:
        handle = self._open("recv", t)
        pipe = self._inbox
        with pipe.lock:
            if pipe.sent:
                _deliver(pipe.sent.popleft(), t, handle)
            elif pipe.closed:
                handle._complete(ChannelClosed("peer closed the channel"))
            else:
                pipe.waiting.append((t, handle))
        return handle

    def _open(self, op: str, t: torch.Tensor) -> TransferHandle:
        """The handle of one transfer of t; refused for a non-contiguous t or on a closed end."""
        check_contiguous(t)
        if self._closed:
            raise ChannelClosed(f"{op} on a closed channel")
        return TransferHandle(f"loopback {op} of {_nbytes(t)} bytes")

    def close(self) -> None:
        self._closed = True
        for pipe in (self._inbox, self._outbox):
            with pipe.lock:
                pipe.closed = True
                waiting, pipe.waiting = list(pipe.waiting), deque()
            for _, handle in waiting:
                handle._complete(ChannelClosed("channel closed"))
