"""Ray actor around DecodeService; tokens stream back as Ray streaming generators (docs/architecture.md)."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from contracts.model_info import ModelInfo
from contracts.transfer import ChannelAddress
from decode_worker.api import Reservation, ReserveRequest, TokenChunk
from decode_worker.service import DecodeService
from engine.config import EngineConfig
from engine.worker_shell import WorkerActor

# What the quantized weight schemes store a weight as (GetModelInfo's weight_dtype).
_WEIGHT_DTYPES = {"w4a16": "int4", "w8": "int8", "w8a8": "int8"}


class DecodeWorkerActor(WorkerActor):
    service: DecodeService

    def __init__(self, worker_id: str, config: EngineConfig, kv_lease_seconds: float = 120.0,
                 channel_host: str = "127.0.0.1", kv_failure_policy: str = "recompute") -> None:
        if channel_host == "auto":  # multi-node: prefill workers on other nodes must reach this listener
            import ray

            channel_host = ray.util.get_node_ip_address()
        super().__init__(config, lambda: DecodeService(worker_id, config, host=channel_host,
                                                       kv_lease_seconds=kv_lease_seconds,
                                                       kv_failure_policy=kv_failure_policy))

    async def model_info(self) -> ModelInfo:
        """What GetModelInfo reports; read from the worker that actually runs the model."""
        cfg, engine_cfg = self.service.engine.model_config, self.service.config
        return ModelInfo(
            model_name=cfg.name,
            context_length=engine_cfg.max_model_len or cfg.max_position_embeddings,
            vocab_size=cfg.vocab_size,
            kv_cache_dtype=self.service.layout.dtype,
            # "auto"/"bf16": GGUF blocks are dequantized at load, weights live in the compute dtype.
            weight_dtype=_WEIGHT_DTYPES.get(engine_cfg.weights, engine_cfg.dtype),
            compute_dtype=engine_cfg.dtype,
            weights=engine_cfg.weights,
            speculative=engine_cfg.spec.describe(),
        )

    async def channel_address(self) -> ChannelAddress:
        return self.service.channel_address()

    async def accept_channel(self, peer_id: str, timeout: float = 120.0) -> None:
        await asyncio.to_thread(self.service.accept_channel, peer_id, timeout)

    async def reserve(self, req: ReserveRequest) -> Reservation:
        return await self.service.reserve(req)

    async def recompute(self, request_id: str) -> bool:
        return await self.service.recompute(request_id)

    async def subscribe(self, subscriber_id: str) -> AsyncIterator[tuple[TokenChunk, ...]]:
        async for batch in self.service.subscribe(subscriber_id):
            yield batch

    async def attach(self, subscriber_id: str, request_id: str) -> None:
        self.service.attach(subscriber_id, request_id)
