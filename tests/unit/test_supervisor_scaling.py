"""Supervisor (channels rejoined per incarnation, dead engines restarted) and Scaler, over fake handles."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from fakes import run

from contracts.stats import EngineStats, WorkerInfo
from contracts.transfer import ChannelAddress
from deploy.scaling import Scaler, request_scale, start_admin
from deploy.supervisor import Supervisor
from router.workers import WorkerPool

pytestmark = pytest.mark.timeout(30)


class _Method:
    def __init__(self, fn: Any) -> None:
        self._fn = fn

    def remote(self, *args: Any) -> Any:
        return asyncio.ensure_future(self._fn(*args))


class FakeActor:
    """What a Ray actor handle offers the supervisor and the scaler: `handle.method.remote(...)` awaitables.
    `restart()` is what Ray does after a kill: a new incarnation with no channels."""

    def __init__(self, worker_id: str, role: str) -> None:
        self.worker_id, self.role = worker_id, role
        self.alive, self.state, self.running = True, "ready", 0
        self.incarnation = uuid.uuid4().hex
        self.peers: dict[str, str] = {}  # prefill: decode id -> incarnation
        self.accepted: list[str] = []
        self.shut_down = False
        for name in ("info", "channel_address", "channel_peers", "accept_channel", "connect_channel",
                     "shutdown", "abort", "metrics_text"):
            setattr(self, name, _Method(getattr(self, f"_{name}")))

    def restart(self) -> None:
        self.alive, self.state, self.peers, self.incarnation = True, "ready", {}, uuid.uuid4().hex

    def _check(self) -> None:
        if not self.alive:
            raise ConnectionError(f"{self.worker_id} is restarting")

    async def _info(self) -> WorkerInfo:
        self._check()
        return WorkerInfo(self.worker_id, self.role, self.state, EngineStats(8, 8, self.running, 0, 0))

    async def _channel_address(self) -> ChannelAddress:
        self._check()
        return ChannelAddress("127.0.0.1", 1, self.worker_id, self.incarnation)

    async def _channel_peers(self) -> tuple[str, dict[str, str]]:
        self._check()
        return self.incarnation, dict(self.peers)

    async def _accept_channel(self, peer_id: str, timeout: float) -> None:
        self._check()
        self.accepted.append(peer_id)

    async def _connect_channel(self, address: ChannelAddress, timeout: float) -> None:
        self._check()
        self.peers[address.decode_id] = address.incarnation

    async def _shutdown(self) -> None:
        self.shut_down = True

    async def _abort(self, request_id: str) -> bool:
        return False

    async def _metrics_text(self) -> str:
        return ""


async def _settle(supervisor: Supervisor) -> None:
    await supervisor.reconcile()
    await asyncio.gather(*supervisor._joining.values(), return_exceptions=True)


def test_supervisor_joins_new_incarnations_only_and_counts_restarts() -> None:
    async def body() -> None:
        p0, d0, d1 = FakeActor("prefill-0", "prefill"), FakeActor("decode-0", "decode"), FakeActor(
            "decode-1", "decode")
        restarts: list[str] = []
        killed: list[Any] = []
        sup = Supervisor([("prefill-0", p0)], [("decode-0", d0), ("decode-1", d1)], restarts.append,
                         kill=killed.append)
        await _settle(sup)
        assert p0.peers == {"decode-0": d0.incarnation, "decode-1": d1.incarnation}
        await _settle(sup)
        assert d0.accepted == ["prefill-0"] and d1.accepted == ["prefill-0"]  # nothing redone
        d0.restart()  # kill -9 + Ray restart: new listener; decode-1's channel is left alone
        await _settle(sup)
        assert p0.peers["decode-0"] == d0.incarnation and d1.accepted == ["prefill-0"]
        p0.restart()  # a restarted prefill worker has no channels: it joins both again
        await _settle(sup)
        assert set(p0.peers) == {"decode-0", "decode-1"} and d1.accepted == ["prefill-0", "prefill-0"]
        assert restarts == ["decode", "prefill"]
        d1.state = "failed"  # its engine thread died though the process answers: killed once, Ray restarts it
        await _settle(sup)
        await _settle(sup)
        assert killed == [d1]

    run(body())


def test_supervisor_skips_a_worker_that_is_down_and_joins_it_once_back() -> None:
    async def body() -> None:
        p0, d0 = FakeActor("prefill-0", "prefill"), FakeActor("decode-0", "decode")
        d0.alive = False
        sup = Supervisor([("prefill-0", p0)], [("decode-0", d0)], lambda role: None, kill=lambda h: None)
        await _settle(sup)
        assert p0.peers == {}
        d0.alive = True
        await _settle(sup)
        assert p0.peers == {"decode-0": d0.incarnation}

    run(body())


def test_scale_up_adds_to_the_pool_and_scale_down_drains_first() -> None:
    async def body() -> None:
        d0 = FakeActor("decode-0", "decode")
        workers: dict[str, list[tuple[str, Any]]] = {"prefill": [], "decode": [("decode-0", d0)]}
        spawned: list[FakeActor] = []

        def spawn(role: str) -> tuple[str, Any]:
            spawned.append(FakeActor(f"{role}-{len(spawned) + 1}", role))
            return spawned[-1].worker_id, spawned[-1]

        pool = WorkerPool([], [])
        killed: list[Any] = []
        scaler = Scaler(spawn, workers, pool, None, drain_timeout_s=10.0, kill=killed.append)
        server = await start_admin(scaler, 0)
        address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        reply = await asyncio.to_thread(request_scale, address, {"prefill": None, "decode": 2}, 10.0)
        assert reply == {"ok": True, "prefill": [], "decode": ["decode-0", "decode-1"]}
        assert [i.worker_id for i in pool.infos()] == ["decode-1"]  # starting until a refresh
        new = spawned[0]
        new.running = 1  # a request still runs there
        scaling_down = asyncio.create_task(scaler.scale({"prefill": None, "decode": 1}))
        await asyncio.sleep(1.5)
        assert pool.infos()[0].state == "draining" and not scaling_down.done() and not killed
        new.running = 0
        assert await scaling_down == {"prefill": [], "decode": ["decode-0"]}
        assert killed == [new] and new.shut_down and pool.infos() == []
        bad = await asyncio.to_thread(request_scale, address, {"prefill": None, "decode": 0}, 10.0)
        assert bad["ok"] is False and "decode workers must be >= 1" in bad["error"]
        server.close()

    run(body(), timeout_s=20)
