"""Rank 0 schedules and samples; follower ranks run the same steps: the leader executor broadcasts each batch
before running it, the follower loop runs what it receives (collectives inside pair up step by step)."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.executor import Executor, RunOutput, SampledStep
from engine.kv_cache import KVCache
from engine.model import LayerHook
from engine.scheduler import SchedulerOutput
from engine.tp.group import TPGroup
from engine.tp.kv_shards import receive_blocks, send_layer_shard
from engine.tp.step_message import LoadMessage, encode_load, receive_message, send_message, send_step


class TPLeaderExecutor(Executor):
    """Rank 0's executor: every launched step is first sent to the followers."""

    def __init__(self, inner: Executor, group: TPGroup) -> None:
        self.inner = inner
        self.group = group
        self._export: tuple[int, ...] = ()

    def launch(self, batch: SchedulerOutput, layer_hook: LayerHook | None = None) -> SampledStep | None:
        if not batch.chunks:
            return None  # nothing runs: the followers are not asked either
        send_step(self.group, batch, self._export)
        return self.inner.launch(batch, layer_hook)

    @torch.inference_mode()
    def execute(self, batch: SchedulerOutput, layer_hook: LayerHook | None = None,
                export_blocks: Sequence[int] = ()) -> RunOutput:
        """`export_blocks`: the followers send their KV shards of these blocks at every layer hook, where
        rank 0's `layer_hook` gathers them (engine/tp/kv_shards.gather_layer)."""
        self._export = tuple(export_blocks)
        try:
            return super().execute(batch, layer_hook)
        finally:
            self._export = ()

    def announce_load(self, block_ids: Sequence[int]) -> None:
        """The followers are to receive their kv heads of these blocks next (kv_shards.scatter_blocks)."""
        send_message(self.group, encode_load(tuple(block_ids)))

    def stop_followers(self) -> None:
        send_step(self.group, None)


def follow(executor: Executor, group: TPGroup, kv: KVCache) -> int:
    """A follower rank's loop: run rank 0's steps and KV loads until it stops; returns the steps run."""
    steps = 0
    while (message := receive_message(group)) is not None:
        if isinstance(message, LoadMessage):
            receive_blocks(group, kv, torch.tensor(message.block_ids, dtype=torch.long, device=kv.device))
            continue
        hook = None
        if message.export_blocks:
            ids = torch.tensor(message.export_blocks, dtype=torch.long, device=kv.device)

            def hook(layer: int, ids: torch.Tensor = ids) -> None:
                send_layer_shard(group, (kv.k[layer], kv.v[layer], *kv.layer_scales(layer)), ids, layer)

        executor.execute(message.batch, hook)
        steps += 1
    return steps
