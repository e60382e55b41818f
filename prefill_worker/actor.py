"""Ray actor around PrefillService: the shared actor tail plus the prefill worker's own methods."""
from __future__ import annotations

import asyncio

from contracts.transfer import ChannelAddress
from engine.config import EngineConfig
from engine.worker_shell import WorkerActor
from prefill_worker.api import PrefillRequest, PrefillResult
from prefill_worker.service import PrefillService


class PrefillWorkerActor(WorkerActor):
    service: PrefillService

    def __init__(self, worker_id: str, config: EngineConfig, kv_lease_seconds: float = 120.0) -> None:
        super().__init__(config, lambda: PrefillService(worker_id, config, kv_lease_seconds=kv_lease_seconds))

    async def connect_channel(self, address: ChannelAddress, timeout: float = 120.0) -> None:
        await asyncio.to_thread(self.service.connect_channel, address, timeout)

    async def channel_peers(self) -> tuple[str, dict[str, str]]:
        return self.service.channel_peers()

    async def prefill(self, req: PrefillRequest) -> PrefillResult:
        return await self.service.prefill(req)
