"""`pdserve scale`: the launcher's loopback admin endpoint; adds workers, or drains and then removes them."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Callable
from typing import Any

import ray

from router.metrics import WorkerMetricsSource
from router.ray_clients import RayDecodeClient, RayPrefillClient
from router.workers import WorkerPool

log = logging.getLogger(__name__)

Worker = tuple[str, Any]  # id and Ray actor handle
ROLES = ("prefill", "decode")


class Scaler:
    """Changes pool sizes on a running cluster, one request at a time.

    Adding: the launcher spawns the actor (Ray places it by the role's resources), it loads its model, the
    supervisor joins its KV channels (it reads the same lists), and the router routes to it once it
    reports ready. Removing the newest workers first: each is drained — the router sends it nothing new,
    its requests run to their end (bounded by `drain_timeout_s`) — then shut down and killed.
    """

    def __init__(self, spawn: Callable[[str], Worker], workers: dict[str, list[Worker]], pool: WorkerPool,
                 metrics_source: WorkerMetricsSource | None, drain_timeout_s: float,
                 kill: Callable[[Any], None] = ray.kill) -> None:
        self._spawn, self._workers, self._pool, self._kill = spawn, workers, pool, kill
        self._metrics_source, self._drain_timeout_s = metrics_source, drain_timeout_s
        self._lock = asyncio.Lock()

    async def scale(self, sizes: dict[str, int | None]) -> dict[str, list[str]]:
        """`sizes`: role -> wanted count (None = unchanged). Returns each role's worker ids afterwards."""
        for role, n in sizes.items():
            if role not in ROLES or (n is not None and n < 1):
                raise ValueError(f"{role} workers must be >= 1, got {n}" if role in ROLES
                                 else f"unknown role {role!r}")
        async with self._lock:
            added: list[tuple[str, Worker]] = []
            removed: list[tuple[str, Worker]] = []
            for role, n in sizes.items():
                workers = self._workers[role]
                while n is not None and len(workers) < n:
                    added.append((role, self._spawn(role)))
                    workers.append(added[-1][1])
                if n is not None:
                    removed += [(role, w) for w in workers[n:]]
            await asyncio.gather(*(self._add(role, wid, handle) for role, (wid, handle) in added))
            await asyncio.gather(*(self._remove(role, w) for role, w in removed))
            return {role: [wid for wid, _ in self._workers[role]] for role in ROLES}

    async def _add(self, role: str, wid: str, handle: Any) -> None:
        await handle.info.remote()  # the model has loaded (raises the start-up error if it failed)
        client = RayDecodeClient(wid, handle) if role == "decode" else RayPrefillClient(wid, handle)
        self._pool.add(role, client)
        self._sync_metrics()
        log.warning("scale: added %s", wid)

    async def _remove(self, role: str, worker: Worker) -> None:
        wid, handle = worker
        self._pool.drain(wid)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._drain_timeout_s
        await asyncio.sleep(1.0)  # a request dispatched to it just before the drain reaches it by now
        while loop.time() < deadline:
            try:
                stats = (await asyncio.wait_for(handle.info.remote(), 5.0)).stats
            except Exception:  # noqa: BLE001 -- dead or unreachable: nothing left to drain
                break
            if stats.num_running == 0 and stats.num_waiting == 0 and stats.queued_prefill_tokens == 0:
                break
            await asyncio.sleep(0.5)
        self._pool.remove(wid)
        self._workers[role].remove(worker)
        self._sync_metrics()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(handle.shutdown.remote(), 10.0)
        self._kill(handle)
        log.warning("scale: drained and removed %s", wid)

    def _sync_metrics(self) -> None:
        if self._metrics_source is not None:
            self._metrics_source.set_clients(self._pool.clients())


async def start_admin(scaler: Scaler, port: int) -> asyncio.Server:
    """One JSON line in (`{"prefill": N, "decode": M}`), one out; loopback only: it changes the cluster."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = json.loads(await asyncio.wait_for(reader.readline(), 10.0))
            sizes = {role: request.get(role) for role in ROLES}
            reply: dict[str, Any] = {"ok": True, **await scaler.scale(sizes)}
        except Exception as e:  # noqa: BLE001 -- the operator gets the reason, the launcher keeps running
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        writer.write((json.dumps(reply) + "\n").encode())
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", port)


def request_scale(address: str, sizes: dict[str, int | None], timeout_s: float) -> dict[str, Any]:
    """The `pdserve scale` side: send the wanted sizes, wait for the launcher's answer."""
    host, _, port = address.rpartition(":")
    with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s) as sock:
        sock.sendall((json.dumps(sizes) + "\n").encode())
        with sock.makefile() as answer:
            line = answer.readline()
    if not line:
        raise ConnectionError(f"the launcher at {address} closed the connection without an answer")
    return json.loads(line)
