"""WorkerPool: the router's view of its workers (clients + latest WorkerInfo), refreshed in the background."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence

from contracts.stats import EngineStats, WorkerInfo
from router.clients import DecodeClient, PrefillClient, WorkerClient

log = logging.getLogger(__name__)

PREFILL, DECODE = "prefill", "decode"
_EMPTY_STATS = EngineStats(
    num_free_blocks=0, num_total_blocks=0, num_running=0, num_waiting=0, queued_prefill_tokens=0
)


class WorkerPool:
    def __init__(
        self, prefill: Sequence[PrefillClient], decode: Sequence[DecodeClient], call_timeout_s: float = 5.0
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

    # -- lookups --------------------------------------------------------------------------------------------
    def infos(self) -> list[WorkerInfo]:
        return list(self._infos.values())

    def ready(self, role: str) -> list[WorkerInfo]:
        return [i for i in self._infos.values() if i.role == role and i.state == "ready"]

    @property
    def serving(self) -> bool:
        """At least one ready prefill and one ready decode worker."""
        return bool(self.ready(PREFILL)) and bool(self.ready(DECODE))

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
        """Pull info() from every worker at once; one that errors or times out is marked "failed"."""
        ids = list(self._clients)

        async def info(client: WorkerClient) -> WorkerInfo:
            # The call is created inside the task, so a cancelled round leaves no never-awaited coroutine.
            return await asyncio.wait_for(client.info(), self._call_timeout_s)

        results = await asyncio.gather(*(info(self._clients[w][1]) for w in ids), return_exceptions=True)
        for wid, result in zip(ids, results, strict=True):
            if wid not in self._clients:
                continue  # removed (scaled down) while the round ran
            old = self._infos[wid]
            if isinstance(result, WorkerInfo):
                new = dataclasses.replace(result, worker_id=wid, role=old.role)  # the client's id is the key
                if wid in self._draining and new.state == "ready":
                    new = dataclasses.replace(new, state="draining")
            else:
                if isinstance(result, asyncio.CancelledError):
                    raise result
                new = dataclasses.replace(old, state="failed")
                if old.state != "failed":
                    log.warning("worker %s did not answer info(): %s: %s", wid, type(result).__name__, result)
            if new.state != old.state:
                log.info("worker %s (%s): %s -> %s", wid, old.role, old.state, new.state)
            self._infos[wid] = new

    async def run_refresher(self, interval_s: float, on_refresh: Callable[[], Awaitable[None]]) -> None:
        """Refresh forever (until cancelled), calling `on_refresh` after each round (health, gauges)."""
        while True:
            try:
                await self.refresh()
                await on_refresh()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not stop health/dispatch updates for good
                log.exception("worker refresh failed")
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

    def note_reserved(self, decode_id: str, num_blocks: int, prefill_locally: bool) -> None:
        if prefill_locally:
            self._adjust(decode_id, num_waiting=1)
        else:
            self._adjust(decode_id, num_free_blocks=-num_blocks, num_running=1)

    def note_prefill(self, prefill_id: str, num_tokens: int, finished: bool) -> None:
        self._adjust(prefill_id, queued_prefill_tokens=-num_tokens if finished else num_tokens)

    # -- membership (pdserve scale) ---------------------------------------------------------------------
    def add(self, role: str, client: WorkerClient) -> None:
        """A new worker; dispatch uses it once a refresh finds it ready."""
        if client.worker_id in self._clients:
            raise ValueError(f"two workers share the id {client.worker_id!r}")
        self._clients[client.worker_id] = (role, client)
        self._infos[client.worker_id] = WorkerInfo(client.worker_id, role, "starting", _EMPTY_STATS)

    def drain(self, worker_id: str) -> None:
        """No new request goes to the worker (state "draining"); those it holds run to their end."""
        self._draining.add(worker_id)
        self._infos[worker_id] = dataclasses.replace(self._infos[worker_id], state="draining")

    def remove(self, worker_id: str) -> None:
        self._clients.pop(worker_id, None)
        self._infos.pop(worker_id, None)
        self._draining.discard(worker_id)
