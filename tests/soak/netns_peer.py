"""One side of the network-fault test in its own network namespace: a prefill or decode service driven by
JSON lines on stdin (replies on stdout), so the control path is a pipe and only KV crosses the veth pair."""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
from typing import Any

from contracts.sampling import SamplingParams
from contracts.transfer import ChannelAddress, TransferTarget
from decode_worker.api import ReserveRequest
from decode_worker.service import DecodeService
from engine.config import EngineConfig
from prefill_worker.api import PrefillRequest
from prefill_worker.service import PrefillService

# random:tiny: both processes build the same seeded weights in a second; the embedded model would take 20 s
# a side on this box and exercise nothing more of the network path. max_batch_tokens=32: several chunks.
CONFIG = EngineConfig(model_path="random:tiny", device="cpu", num_kv_blocks=64, max_batch_tokens=32)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True)


class DecodePeer:
    def __init__(self, host: str, lease_s: float, policy: str) -> None:
        self.service = DecodeService("decode-0", CONFIG, host=host, kv_lease_seconds=lease_s,
                                     kv_failure_policy=policy)
        self._results: dict[str, asyncio.Task] = {}

    def hello(self) -> dict[str, Any]:
        address = self.service.channel_address()
        threading.Thread(target=self.service.accept_channel, args=("prefill-0",), daemon=True).start()
        return {"host": address.host, "port": address.port, "incarnation": address.incarnation}

    async def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        if cmd["op"] == "reserve":
            req = ReserveRequest(cmd["rid"], tuple(cmd["prompt"]), greedy(cmd["max_tokens"]))
            reservation = await self.service.reserve(req)
            self._results[cmd["rid"]] = asyncio.create_task(self._collect(cmd["rid"]))
            return {"blocks": list(reservation.block_ids)}
        if cmd["op"] == "result":
            return await self._results.pop(cmd["rid"])
        if cmd["op"] == "stats":
            stats = self.service.engine.stats()
            endpoint = self.service._endpoints.get("prefill-0")
            return {"free": stats.num_free_blocks, "total": stats.num_total_blocks,
                    "frames_dropped": endpoint.frames_dropped if endpoint is not None else 0,
                    "counters": _counters(self.service)}
        raise ValueError(f"unknown op {cmd['op']!r}")

    async def _collect(self, rid: str) -> dict[str, Any]:
        ids, reason, error = [], None, None
        async for chunk in self.service.stream(rid):
            ids.extend(chunk.token_ids)
            reason, error = chunk.finish_reason, chunk.error or error
        return {"ids": ids, "reason": reason.name if reason is not None else None, "error": error}


class PrefillPeer:
    def __init__(self, lease_s: float, decode: dict[str, Any]) -> None:
        self.service = PrefillService("prefill-0", CONFIG, kv_lease_seconds=lease_s)
        self.decode = ChannelAddress(decode["host"], decode["port"], "decode-0", decode["incarnation"])

    def hello(self) -> dict[str, Any]:
        self.service.connect_channel(self.decode)
        return {"connected": True}

    async def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        if cmd["op"] != "prefill":
            raise ValueError(f"unknown op {cmd['op']!r}")
        target = TransferTarget(cmd["rid"], "decode-0", tuple(cmd["blocks"]), len(cmd["prompt"]))
        try:
            result = await self.service.prefill(
                PrefillRequest(cmd["rid"], tuple(cmd["prompt"]), greedy(cmd["max_tokens"]), target))
        except Exception as e:  # the failure is the test's subject: report it, keep serving
            return {"error": f"{type(e).__name__}: {e}"}
        return {"first": result.first_token_id}


def _counters(service: DecodeService) -> dict[str, float]:
    """The transfer-failure and recompute counters (name{labels} -> value)."""
    return {s.name + json.dumps(s.labels, sort_keys=True): s.value
            for family in service.metrics.registry.collect() for s in family.samples
            if s.name.endswith("_total") and ("transfer" in s.name or "recompute" in s.name)}


def _reply(lock: threading.Lock, tag: Any, body: dict[str, Any]) -> None:
    with lock:
        sys.stdout.write(json.dumps({"tag": tag, **body}) + "\n")
        sys.stdout.flush()


async def serve(peer: DecodePeer | PrefillPeer) -> None:
    loop, lock = asyncio.get_running_loop(), threading.Lock()
    _reply(lock, "hello", await asyncio.to_thread(peer.hello))

    async def one(cmd: dict[str, Any]) -> None:
        try:
            body = await peer.handle(cmd)
        except Exception as e:  # a broken command must not end the peer silently
            body = {"exception": f"{type(e).__name__}: {e}"}
        _reply(lock, cmd["tag"], body)

    tasks = set()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        task = asyncio.create_task(one(json.loads(line)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    peer.service.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("role", choices=("prefill", "decode"))
    p.add_argument("--host", required=True, help="decode: the address its KV listener binds")
    p.add_argument("--lease", type=float, required=True, help="KV transfer lease, seconds")
    p.add_argument("--policy", default="recompute", help="decode: --kv-failure-policy")
    p.add_argument("--decode", default=None, help="prefill: the decode peer's hello line (JSON)")
    args = p.parse_args()
    peer = DecodePeer(args.host, args.lease, args.policy) if args.role == "decode" else \
        PrefillPeer(args.lease, json.loads(args.decode))
    asyncio.run(serve(peer))


if __name__ == "__main__":
    main()
