"""The shell both workers share: a service owning an engine on its own thread, and the actor tail over it."""
from __future__ import annotations

import asyncio
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar, TypeVar

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from contracts.stats import EngineStats, TPRankInfo, WorkerInfo
from engine.config import EngineConfig
from engine.cpu_affinity import pin_process
from engine.engine_thread import EngineThread
from engine.executor import RunOutput
from engine.llm_engine import LLMEngine
from engine.scheduler import SchedulerOutput
from engine.sequence import Sequence
from engine.tp.worker_ranks import LocalTPRanks

T = TypeVar("T")
# How stale the prefix-cache hashes in info() may be (the router refreshes every 0.1 s; a stale hash only
# costs a prefix-aware dispatch a miss).
_CACHED_BLOCKS_PERIOD_S = 0.1


class WorkerMetrics:
    """A worker's own Prometheus registry with what both roles count; each role's subclass adds its own
    families. The router re-exposes it at scrape time (`metrics_text`) with a `worker` label."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._transfer_failures = Counter("pdserve_kv_transfer_failures",
                                          "KV transfers that failed, by reason", ["reason"],
                                          registry=self.registry)

    def watch_prefix_cache(self, engine: LLMEngine) -> None:
        """Export the engine's prefix-cache hit ratio, read at scrape time (no engine-thread hop)."""
        prefix = engine.scheduler.prefix
        gauge = Gauge("pdserve_prefix_cache_hit_ratio",
                      "Prompt tokens found in the prefix cache / prompt tokens looked up, since start",
                      registry=self.registry)
        gauge.set_function(lambda: prefix.hit_ratio if prefix is not None else 0.0)

    def transfer_failed(self, reason: str) -> None:
        self._transfer_failures.labels(reason=reason).inc()

    def exposition(self) -> str:
        return generate_latest(self.registry).decode()


class WorkerService(ABC):
    """One worker without Ray: an `LLMEngine` that only the engine thread touches, plus what the role adds.

    The base owns the engine thread (idle wait, error capture: a dead thread makes `info()` report "failed"),
    the step loop, `info`, `abort`, `metrics_text` and `shutdown`. A role implements the transfers it polls
    between steps (`_poll_transfers`), what one step does with the batch (`_execute`, `_after_step`), how a
    request is dropped (`_abort`, on the engine thread), how its waiters are failed if a step raises
    (`_fail_waiters`, so no caller hangs on a dead thread) and what it closes (`_close`). A subclass builds
    its own state after `super().__init__` and then calls `start()`.
    """

    role: ClassVar[str]  # "prefill" | "decode", as reported in WorkerInfo
    metrics: WorkerMetrics

    def __init__(self, worker_id: str, config: EngineConfig, progress: bool = False) -> None:
        self.worker_id = worker_id
        self.config = config
        # TP > 1: this process is rank 0 (schedules, samples, owns the KV channels); ranks 1..N-1 are
        # follower processes it spawns and ends (engine/tp/worker_ranks.py says why not N actors).
        self.tp_ranks = LocalTPRanks(config, progress=progress) if config.tp_size > 1 else None
        self.engine = (self.tp_ranks.engine if self.tp_ranks is not None
                       else LLMEngine(config, progress=progress))
        self._rank_infos = self.tp_ranks.ranks if self.tp_ranks is not None else (
            TPRankInfo(0, config.device, os.getpid(), tuple(range(self.engine.model_config.num_kv_heads))),)
        self._thread = EngineThread(f"{self.role}-{worker_id}", self._step, idle_poll_s=self._idle_poll_s,
                                    on_error=self._engine_died)
        # Written only by the engine thread, read by info() on the actor's loop: swapping one reference to an
        # immutable snapshot needs no lock, and the control plane never queues behind a step.
        self._stats: EngineStats = self.engine.stats()
        # The prefix cache's block hashes for prefix-aware dispatch: up to num_kv_blocks of them, so they are
        # republished at most every _CACHED_BLOCKS_PERIOD_S, not after every step.
        self._cached_blocks: frozenset[int] = frozenset()
        self._cached_blocks_at = float("-inf")

    def start(self) -> None:
        self.metrics.watch_prefix_cache(self.engine)
        self._thread.start()

    # ---- called from the actor's event loop ----

    async def info(self) -> WorkerInfo:
        """Answers at once, never behind a running step: the state is the engine thread's liveness and the
        stats are the snapshot it published after its last command or step (a long step is not a failure)."""
        # A dead follower rank fails the worker too: its next step could not run (the supervisor restarts it).
        if self._thread.alive and (self.tp_ranks is None or self.tp_ranks.alive):
            return WorkerInfo(self.worker_id, self.role, "ready", self._stats, self.config.block_size,
                              self._cached_blocks, self._rank_infos)
        nothing = EngineStats(0, self.config.num_kv_blocks, 0, 0, 0)
        return WorkerInfo(self.worker_id, self.role, "failed", nothing, tp_ranks=self._rank_infos)

    async def abort(self, request_id: str) -> bool:
        """Drop a request in any state, freeing what it holds exactly once; False if it is unknown here."""
        return await self._on_engine_thread(lambda: self._abort(request_id, "abort"))

    def metrics_text(self) -> str:
        return self.metrics.exposition()

    def shutdown(self) -> None:
        graceful = self._thread.alive  # a dead engine thread may have left the followers inside a collective
        self._thread.stop()
        self._close()
        if self.tp_ranks is not None:  # after the engine thread: the stop message must not split a step
            self.tp_ranks.close(graceful=graceful)

    async def _on_engine_thread(self, fn: Callable[[], T]) -> T:
        """Runs `fn` between engine steps and awaits its result (or exception) without blocking the loop;
        the stats snapshot is republished after it, so info() sees its effect before the next step ends."""

        def run_and_publish() -> T:
            try:
                return fn()
            finally:
                self._publish_stats()

        return await asyncio.wrap_future(self._thread.submit(run_and_publish))

    # ---- engine thread ----

    def _step(self) -> bool:
        """One step, read aloud: advance transfers → schedule → execute → postprocess → hand results on."""
        did_work = self._poll_transfers()
        if self.engine.has_work():
            out = self.engine.schedule()
            if out.num_batched_tokens:
                run = self._execute(out)
                finished = self.engine.postprocess(out, run)
                self._publish_stats()  # before results reach callers, who may ask info() at once
                self._after_step(out, run, finished)
                did_work = True
        if did_work:
            self._publish_stats()  # what the role did after the step (stop strings, transfers) shows too
        return did_work

    def _publish_stats(self) -> None:
        self._stats = self.engine.stats()
        now = time.monotonic()
        if now - self._cached_blocks_at >= _CACHED_BLOCKS_PERIOD_S:
            self._cached_blocks = frozenset(self.engine.block_manager.cached_hashes())
            self._cached_blocks_at = now

    def _engine_died(self, error: BaseException) -> None:
        self._fail_waiters(f"{self.worker_id} engine thread died: {type(error).__name__}: {error}")

    def _execute(self, out: SchedulerOutput) -> RunOutput:
        """Runs the scheduled batch; a role that acts during the forward pass (layer hooks) overrides it."""
        return self.engine.execute(out)

    def _idle_poll_s(self) -> float:
        """Seconds an idle engine thread waits before polling transfers again (commands and wake() cut it).
        With none in flight only a command can bring work, and it wakes the thread: waking every 5 ms
        anyway cost an idle worker ~9 ms of CPU a second, 1.2 ms at 0.1 s (a 2-core box's decode core
        shares with it)."""
        return 0.005 if self._transfers_in_flight() else 0.1

    @abstractmethod
    def _poll_transfers(self) -> bool:
        """Advances this role's KV transfers; True if any changed state."""

    @abstractmethod
    def _transfers_in_flight(self) -> bool:
        """Whether any KV transfer of this role waits to be polled (a lease to watch, a send to complete)."""

    @abstractmethod
    def _after_step(self, out: SchedulerOutput, run: RunOutput, finished: list[Sequence]) -> None:
        """Hands this step's results on (tokens to streams, completed sends to callers)."""

    @abstractmethod
    def _abort(self, request_id: str, reason: str) -> bool:
        """Drops `request_id` from the engine and this role's own state; True if anything held it."""

    @abstractmethod
    def _fail_waiters(self, error: str) -> None:
        """The engine thread is dying: end every request still waiting on this role with `error`."""

    @abstractmethod
    def _close(self) -> None:
        """Releases this role's transports once the engine thread has stopped."""


class WorkerActor:
    """The async actor tail both workers share: forwards to the service; the engine runs on its own thread.

    Plain Python: the launcher wraps each role's subclass with `ray.remote`, so this module needs no Ray.
    """

    def __init__(self, config: EngineConfig, make_service: Callable[[], WorkerService]) -> None:
        if config.cpu_affinity:  # before the engine thread and torch's pool start: they inherit it
            pin_process(config.cpu_affinity)
        if config.num_threads:  # the actor owns its process: size torch's pool before the engine is built
            torch.set_num_threads(config.num_threads)
        self.service = make_service()

    async def info(self) -> WorkerInfo:
        return await self.service.info()

    async def abort(self, request_id: str) -> bool:
        return await self.service.abort(request_id)

    async def metrics_text(self) -> str:
        return self.service.metrics_text()

    async def shutdown(self) -> None:
        self.service.shutdown()
