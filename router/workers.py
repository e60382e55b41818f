"""WorkerPool: the router's view of its workers (clients + latest WorkerInfo), kept by their heartbeats."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from contracts.stats import EngineStats, WorkerInfo
from router.clients import DecodeClient, PrefillClient, WorkerClient

log = logging.getLogger(__name__)

PREFILL, DECODE = "prefill", "decode"
_EMPTY_STATS = EngineStats(
    num_free_blocks=0, num_total_blocks=0, num_running=0, num_waiting=0, queued_prefill_tokens=0
)


class WorkerPool:
    """Liveness is a heartbeat: every answered info() is one. A worker is marked "failed" when a call errors
    (gone, transport failure), when it says so itself (its engine thread died), or when it has not answered
    for `heartbeat_timeout_s`; a single slow answer only leaves its last snapshot in place."""

    def __init__(
        self,
        prefill: Sequence[PrefillClient],
        decode: Sequence[DecodeClient],
        call_timeout_s: float = 5.0,
        heartbeat_timeout_s: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clients: dict[str, tuple[str, WorkerClient]] = {}
        for role, clients in ((PREFILL, prefill), (DECODE, decode)):
            for c in clients:
                if c.worker_id in self._clients:
                    raise ValueError(f"two workers share the id {c.worker_id!r}")
                self._clients[c.worker_id] = (role, c)
        self._infos = {
            wid: WorkerInfo(wid, role, "starting", _EMPTY_STATS) for wid, (role, _) in self._clients.items()
        }
        self._call_timeout_s = call_timeout_s
        self._draining: set[str] = set()  # `pdserve scale` removes them once their requests ended
        self._heartbeat_timeout_s = heartbeat_timeout_s
        self._clock = clock
        now = clock()
        self._heard = dict.fromkeys(self._clients, now)  # last answered info(); creation counts as one
        # Bumped whenever a decode worker's report differs from the last: room for a queued request may exist.
        self.decode_reports_changed = 0

    # -- lookups --------------------------------------------------------------------------------------------
    def infos(self) -> list[WorkerInfo]:
        return list(self._infos.values())

    def ready(self, role: str) -> list[WorkerInfo]:
        return [i for i in self._infos.values() if i.role == role and i.state == "ready"]

    @property
    def serving(self) -> bool:
        """At least one ready prefill and one ready decode worker."""
        return bool(self.ready(PREFILL)) and bool(self.ready(DECODE))

    def decode_slots(self) -> int | None:
        """Sequence slots of the ready decode workers together (the router's in-flight bound); None if one of
        them reports no cap."""
        ready = self.ready(DECODE)
        if any(w.stats.max_num_seqs == 0 for w in ready):
            return None
        return sum(w.stats.max_num_seqs for w in ready)

    def decode(self, worker_id: str) -> DecodeClient:
        client = self._clients[worker_id][1]
        if not isinstance(client, DecodeClient):
            raise KeyError(f"{worker_id!r} is not a decode worker")
        return client

    def prefill(self, worker_id: str) -> PrefillClient:
        client = self._clients[worker_id][1]
        if not isinstance(client, PrefillClient):
            raise KeyError(f"{worker_id!r} is not a prefill worker")
        return client

    def clients(self) -> list[WorkerClient]:
        return [c for _, c in self._clients.values()]

    # -- refresh --------------------------------------------------------------------------------------------
    async def refresh(self) -> None:
        """Ask every worker at once (start-up, tests); the refresher polls each on its own instead."""
        await asyncio.gather(*(self.refresh_one(wid) for wid in list(self._clients)))

    async def refresh_one(self, worker_id: str) -> None:
        """One heartbeat round for one worker: take its answer, or judge its silence."""
        role, client = self._clients[worker_id]
        old = self._infos[worker_id]
        try:
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel that lands as the call
            # completes, and the refresher would then poll on after RouterServer.stop() cancelled it.
            async with asyncio.timeout(self._call_timeout_s):
                result = await client.info()
        except TimeoutError:
            silent_s = self._clock() - self._heard[worker_id]
            if silent_s < self._heartbeat_timeout_s:
                log.debug("worker %s slow to answer info() (%.1fs without a heartbeat)", worker_id, silent_s)
                return
            new, why = dataclasses.replace(old, state="failed"), f"no heartbeat for {silent_s:.1f}s"
        except Exception as e:  # WorkerUnavailable (gone, transport) or an error raised by the worker
            new, why = dataclasses.replace(old, state="failed"), f"info() failed: {type(e).__name__}: {e}"
        else:
            self._heard[worker_id] = self._clock()
            new, why = dataclasses.replace(result, worker_id=worker_id, role=role), "it reported so"
            if worker_id in self._draining and new.state == "ready":
                new = dataclasses.replace(new, state="draining")
        if worker_id not in self._clients:
            return  # removed (scaled down) while the call ran
        if new.state != old.state:
            log_at = logging.WARNING if new.state == "failed" else logging.INFO
            log.log(log_at, "worker %s (%s): %s -> %s (%s)", worker_id, role, old.state, new.state, why)
        if role == DECODE and new != old:
            self.decode_reports_changed += 1
        self._infos[worker_id] = new

    async def run_refresher(self, interval_s: float, on_refresh: Callable[[], Awaitable[None]]) -> None:
        """Poll every worker on its own loop (a silent one delays no other) forever, until cancelled, calling
        `on_refresh` after each answer (health, gauges, admission capacity)."""

        async def poll(worker_id: str) -> None:
            while worker_id in self._clients:  # a worker removed by `pdserve scale` stops being polled
                try:
                    await self.refresh_one(worker_id)
                    await on_refresh()
                except asyncio.CancelledError:
                    raise
                except Exception:  # a bug here must not stop health/dispatch updates for good
                    log.exception("refresh of worker %s failed", worker_id)
                await asyncio.sleep(interval_s)

        async with asyncio.TaskGroup() as group:
            polled: set[str] = set()  # worker ids are never reused
            while True:  # workers added by `pdserve scale` get their own loop within an interval
                for wid in self._clients.keys() - polled:
                    polled.add(wid)
                    group.create_task(poll(wid), name=f"refresh-{wid}")
                await asyncio.sleep(interval_s)

    # -- optimistic load accounting ----------------------------------------------------------------------
    # Between refreshes the snapshots go stale; without these notes every request of a burst would pick the
    # same "least loaded" worker. The next refresh replaces the estimate with the worker's own numbers.
    def _adjust(self, worker_id: str, **delta: int) -> None:
        info = self._infos.get(worker_id)
        if info is None:  # removed by `pdserve scale` while a request still finished there
            return
        s = info.stats
        stats = dataclasses.replace(s, **{k: max(0, getattr(s, k) + v) for k, v in delta.items()})
        self._infos[worker_id] = dataclasses.replace(info, stats=stats)

    def note_reserved(self, decode_id: str, num_blocks: int, prefill_locally: bool, num_tokens: int) -> None:
        """A reservation on `decode_id`: a local prompt of `num_tokens` queues there (conditional placement
        prices the queue), a remote one holds blocks and awaits its KV."""
        if prefill_locally:
            self._adjust(decode_id, num_waiting=1, queued_prefill_tokens=num_tokens)
        else:
            self._adjust(decode_id, num_free_blocks=-num_blocks, num_running=1, num_awaiting_kv=1)

    def note_prefill(self, prefill_id: str, num_tokens: int, finished: bool) -> None:
        self._adjust(prefill_id, queued_prefill_tokens=-num_tokens if finished else num_tokens)

    # -- membership (pdserve scale) ---------------------------------------------------------------------
    def add(self, role: str, client: WorkerClient) -> None:
        """A new worker; dispatch uses it once a refresh finds it ready."""
        if client.worker_id in self._clients:
            raise ValueError(f"two workers share the id {client.worker_id!r}")
        self._clients[client.worker_id] = (role, client)
        self._infos[client.worker_id] = WorkerInfo(client.worker_id, role, "starting", _EMPTY_STATS)
        self._heard[client.worker_id] = self._clock()

    def drain(self, worker_id: str) -> None:
        """No new request goes to the worker (state "draining"); those it holds run to their end."""
        self._draining.add(worker_id)
        self._infos[worker_id] = dataclasses.replace(self._infos[worker_id], state="draining")

    def remove(self, worker_id: str) -> None:
        self._clients.pop(worker_id, None)
        self._infos.pop(worker_id, None)
        self._heard.pop(worker_id, None)
        self._draining.discard(worker_id)
