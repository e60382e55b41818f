"""Supervisor: joins every prefill/decode pair by a KV channel as workers (re)start; restarts dead engines."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import ray

log = logging.getLogger(__name__)

# A worker's stable id ("decode-0") and its Ray actor handle; Ray restarts the process behind the handle.
Worker = tuple[str, Any]


class Supervisor:
    """Reconciles membership every `interval_s`, with no global re-initialisation.

    Ray restarts a worker whose process died (actors are created with `max_restarts`), behind the same
    handle, so the router's clients stay valid. A restarted process is a new *incarnation* (a fresh id each
    worker draws at start): its channels are gone. Each round asks every decode worker for its channel
    address (which names its incarnation) and every prefill worker which incarnation it holds a channel to;
    each pair that differs (a restarted decode worker, a restarted prefill worker with no channels, a newly
    added worker) gets one rendezvous of its own (`accept_channel` + `connect_channel`), while every other
    channel keeps running. A worker whose engine thread died (info says "failed" though the process lives)
    is killed so that Ray restarts it. `on_restart(role)` is called once per new incarnation seen.
    """

    def __init__(self, prefill: list[Worker], decode: list[Worker], on_restart: Callable[[str], None],
                 interval_s: float = 0.5, call_timeout_s: float = 5.0, join_timeout_s: float = 30.0,
                 kill: Callable[[Any], None] = lambda handle: ray.kill(handle, no_restart=False)) -> None:
        self.prefill, self.decode = prefill, decode  # the launcher's lists: scale edits them in place
        self._on_restart, self._kill = on_restart, kill
        self._interval_s, self._call_timeout_s = interval_s, call_timeout_s
        self._join_timeout_s = join_timeout_s
        self._incarnations: dict[str, str] = {}  # worker id -> incarnation last seen
        self._joining: dict[tuple[str, str], asyncio.Task[None]] = {}  # (prefill id, decode id) -> join
        self._killed: set[tuple[str, str]] = set()  # (id, incarnation) killed for a dead engine, once each

    async def run(self) -> None:
        while True:
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not end supervision for good
                log.exception("supervisor round failed")
            await asyncio.sleep(self._interval_s)

    async def close(self) -> None:
        joins = list(self._joining.values())
        for task in joins:
            task.cancel()
        await asyncio.gather(*joins, return_exceptions=True)

    async def _call(self, handle: Any, method: str, *args: Any) -> Any:
        return await asyncio.wait_for(getattr(handle, method).remote(*args), self._call_timeout_s)

    async def reconcile(self) -> None:
        """One round: note new incarnations, kill failed engines, start the joins that are missing."""
        decode, prefill = list(self.decode), list(self.prefill)
        addresses = await asyncio.gather(*(self._call(h, "channel_address") for _, h in decode),
                                         return_exceptions=True)
        peers = await asyncio.gather(*(self._call(h, "channel_peers") for _, h in prefill),
                                     return_exceptions=True)
        live_decode = [(wid, h, a) for (wid, h), a in zip(decode, addresses, strict=True)
                       if not isinstance(a, BaseException)]
        for wid, _, address in live_decode:
            self._seen(wid, "decode", address.incarnation)
        for (pid, p), result in zip(prefill, peers, strict=True):
            if isinstance(result, BaseException):
                continue  # dead or restarting: Ray brings it back, a later round joins it
            incarnation, joined = result
            self._seen(pid, "prefill", incarnation)
            for did, d, address in live_decode:
                if joined.get(did) != address.incarnation and (pid, did) not in self._joining:
                    task = asyncio.create_task(self._join(pid, p, did, d, address))
                    self._joining[(pid, did)] = task
                    task.add_done_callback(lambda _t, key=(pid, did): self._joining.pop(key, None))
        await self._restart_failed(decode + prefill)

    def _seen(self, worker_id: str, role: str, incarnation: str) -> None:
        previous = self._incarnations.get(worker_id)
        self._incarnations[worker_id] = incarnation
        if previous is not None and previous != incarnation:
            log.warning("%s worker %s restarted (new incarnation %s)", role, worker_id, incarnation[:8])
            self._on_restart(role)

    async def _join(self, pid: str, prefill: Any, did: str, decode: Any, address: Any) -> None:
        t = self._join_timeout_s
        try:
            await asyncio.wait_for(asyncio.gather(decode.accept_channel.remote(pid, t),
                                                  prefill.connect_channel.remote(address, t)), t + 5)
            log.info("KV channel %s -> %s joined (decode incarnation %s)", pid, did, address.incarnation[:8])
        except Exception as e:  # a peer died mid-join: the next round tries again
            log.warning("KV channel %s -> %s did not join: %s: %s", pid, did, type(e).__name__, e)

    async def _restart_failed(self, workers: list[Worker]) -> None:
        infos = await asyncio.gather(*(self._call(h, "info") for _, h in workers), return_exceptions=True)
        for (wid, handle), info in zip(workers, infos, strict=True):
            if isinstance(info, BaseException) or info.state != "failed":
                continue
            incarnation = self._incarnations.get(wid, "")
            if (wid, incarnation) in self._killed:
                continue
            self._killed.add((wid, incarnation))
            log.warning("worker %s reports its engine failed: killing it so that Ray restarts it", wid)
            self._kill(handle)
