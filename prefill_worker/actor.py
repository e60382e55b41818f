"""Ray actor around PrefillService."""
from __future__ import annotations

import asyncio

import torch

from contracts.stats import WorkerInfo
from contracts.transfer import ChannelAddress
from engine.config import EngineConfig
from prefill_worker.api import PrefillRequest, PrefillResult
from prefill_worker.service import PrefillService


class PrefillWorkerActor:
    """Async actor: every method runs on the actor's event loop; the engine runs on its own thread."""

    def __init__(self, worker_id: str, config: EngineConfig, kv_lease_seconds: float = 120.0) -> None:
        if config.num_threads:  # the actor owns its process: size torch's thread pool for it
            torch.set_num_threads(config.num_threads)
        self.service = PrefillService(worker_id, config, kv_lease_seconds=kv_lease_seconds)

    async def info(self) -> WorkerInfo:
        return await self.service.info()

    async def connect_channel(self, address: ChannelAddress) -> None:
        await asyncio.to_thread(self.service.connect_channel, address)

    async def prefill(self, req: PrefillRequest) -> PrefillResult:
        return await self.service.prefill(req)

    async def abort(self, request_id: str) -> bool:
        return await self.service.abort(request_id)

    async def metrics_text(self) -> str:
        return self.service.metrics.exposition()

    async def shutdown(self) -> None:
        self.service.shutdown()
