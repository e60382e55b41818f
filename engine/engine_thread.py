"""Runs an engine loop on one dedicated thread; other threads hand it commands and await the results."""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


class EngineThread:
    """All engine mutations happen on this thread, so scheduler and cache need no locks.

    `step` does one unit of work and returns True if it did any. When idle the thread sleeps until a command
    arrives, someone calls `wake()` (e.g. a transfer finished on another thread), or `idle_poll_s()` seconds
    pass, so state machines with leases still get polled; owners shorten it while they wait on something
    imminent. If `step` raises, the thread records the error (`alive` turns False), calls `on_error` with it
    (to fail whoever still waits on the owner) and ends.
    """

    def __init__(self, name: str, step: Callable[[], bool],
                 idle_poll_s: Callable[[], float] = lambda: 0.005,
                 on_error: Callable[[BaseException], None] = lambda e: None) -> None:
        self._step = step
        self._idle_poll_s = idle_poll_s
        self._on_error = on_error
        self._inbox: queue.SimpleQueue[tuple[Callable[[], object], Future]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def wake(self) -> None:
        """Ends an idle wait now (thread-safe)."""
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        """Run `fn` on the engine thread between steps; the future carries its result or exception."""
        fut: Future = Future()
        if self._stopping.is_set() or self.error is not None:
            fut.set_exception(RuntimeError("engine thread is not running"))
            return fut
        self._inbox.put((fn, fut))
        self._wake.set()
        return fut

    def _drain_inbox(self) -> None:
        while True:
            try:
                fn, fut = self._inbox.get_nowait()
            except queue.Empty:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:  # handed to the caller, not raised here
                fut.set_exception(e)

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._drain_inbox()
                if not self._step():
                    self._wake.wait(self._idle_poll_s())
                    self._wake.clear()
        except BaseException as e:  # the worker reports this as state "failed"
            log.exception("engine thread %s died", self._thread.name)
            self.error = e
            self._on_error(e)  # after `error` is set: whoever it wakes already sees the thread dead
        finally:
            self._drain_inbox_with_error()

    def _drain_inbox_with_error(self) -> None:
        while True:
            try:
                _, fut = self._inbox.get_nowait()
            except queue.Empty:
                return
            if fut.set_running_or_notify_cancel():
                fut.set_exception(RuntimeError("engine thread stopped"))
