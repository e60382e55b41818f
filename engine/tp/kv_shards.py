"""A TP worker's KV as whole heads: rank 0 gathers the ranks' kv-head shards of some blocks (to send them to
another worker) and scatters whole-head blocks to the ranks that hold each head (after receiving them).

Every per-layer cache tensor (k, v and the spec's scales) is `[num_blocks, block_size, kv_heads, ...]`, so a
shard is a slice along axis 2. Shards move rank ↔ rank 0 as one uint8 payload per message (point-to-point
send/recv on the worker's TP group, in the same program order on both ends, between the step's collectives).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from engine.config import ModelConfig
from engine.kv_cache import KVCache
from engine.tp.group import TPGroup
from engine.tp.shard import ShardPlan

_HEAD_AXIS = 2
_LOAD_TAG = 1 << 20  # above every layer index (the export tags)

LayerTensors = tuple[torch.Tensor, ...]  # (k, v, *scales) of one layer, scales in spec.scale_shapes() order


def layer_tensors(kv: KVCache, layer: int) -> LayerTensors:
    return (kv.k[layer], kv.v[layer], *kv.layer_scales(layer))


ShardShape = tuple[torch.dtype, tuple[int, ...]]  # one tensor's dtype and per-block shape on some rank


def shard_shapes(tensors: Sequence[torch.Tensor], num_heads: int) -> list[ShardShape]:
    """Each tensor's dtype and per-block shape with `num_heads` on the head axis (another rank's shard)."""
    out = []
    for t in tensors:
        block = list(t.shape[1:])
        block[_HEAD_AXIS - 1] = num_heads
        out.append((t.dtype, tuple(block)))
    return out


def _pack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.contiguous().view(torch.uint8).reshape(-1) for t in tensors])


def _nbytes(shapes: Sequence[ShardShape], num_blocks: int) -> int:
    return sum(num_blocks * math.prod(block) * dtype.itemsize for dtype, block in shapes)


def _unpack(payload: torch.Tensor, shapes: Sequence[ShardShape], num_blocks: int) -> list[torch.Tensor]:
    out, at = [], 0
    for dtype, block in shapes:
        size = num_blocks * math.prod(block) * dtype.itemsize
        out.append(payload[at:at + size].view(dtype).view(num_blocks, *block))
        at += size
    return out


class KVHeadMap:
    """Which global kv head each rank's local cache slot holds (engine/tp/heads.py), and for each global
    head the one (rank, slot) rank 0 reads it from when it gathers (the first holder: a head replicated on
    several ranks when tp > kv heads holds the same values on each)."""

    def __init__(self, config: ModelConfig, size: int) -> None:
        self.num_kv_heads = config.num_kv_heads
        self.rank_heads = [ShardPlan.of(config, r, size).heads.kv_heads for r in range(size)]
        owner: dict[int, tuple[int, int]] = {}
        for rank, heads in enumerate(self.rank_heads):
            for slot, head in enumerate(heads):
                owner.setdefault(head, (rank, slot))
        if sorted(owner) != list(range(self.num_kv_heads)):
            raise ValueError(f"TP shards hold kv heads {sorted(owner)}, not all {self.num_kv_heads}")
        # Per rank: (global heads it supplies, its local slots for them), as index tensors for index_copy.
        self._gather = [([h for h, (r, _) in owner.items() if r == rank],
                         [s for _, (r, s) in owner.items() if r == rank]) for rank in range(size)]

    def whole(self, shards: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
        """shards[rank][i]: rank's tensor i `[n, block_size, rank's kv heads, ...]` → whole-head tensors."""
        out = []
        for i, first in enumerate(shards[0]):
            shape = list(first.shape)
            shape[_HEAD_AXIS] = self.num_kv_heads
            whole = first.new_empty(shape)
            for rank, (heads, slots) in enumerate(self._gather):
                if heads:
                    src = shards[rank][i].index_select(_HEAD_AXIS, torch.tensor(slots, device=first.device))
                    whole.index_copy_(_HEAD_AXIS, torch.tensor(heads, device=first.device), src)
            out.append(whole)
        return out

    def shard(self, whole: Sequence[torch.Tensor], rank: int) -> list[torch.Tensor]:
        """Rank's slots of whole-head tensors (a replicated head goes to every rank that holds it)."""
        heads = torch.tensor(self.rank_heads[rank], device=whole[0].device)
        return [t.index_select(_HEAD_AXIS, heads) for t in whole]


def _recv(group: TPGroup, nbytes: int, src: int, tag: int) -> torch.Tensor:
    payload = torch.empty(nbytes, dtype=torch.uint8, device=group.device)
    group.pg.recv([payload], src, tag).wait()
    return payload


def _send(group: TPGroup, payload: torch.Tensor, dst: int, tag: int) -> None:
    group.pg.send([payload.to(group.device)], dst, tag).wait()


def gather_layer(group: TPGroup, heads: KVHeadMap, tensors: LayerTensors, block_ids: torch.Tensor,
                 layer: int) -> list[torch.Tensor]:
    """Rank 0, inside the layer hook of a step whose followers export `block_ids`: whole-head
    (k, v, *scales)[block_ids] of `layer`, other ranks' shards received from their `send_layer_shard`."""
    n = block_ids.numel()
    shards = [[t.index_select(0, block_ids) for t in tensors]]
    for rank in range(1, group.size):
        shapes = shard_shapes(tensors, len(heads.rank_heads[rank]))
        shards.append(_unpack(_recv(group, _nbytes(shapes, n), rank, layer), shapes, n))
    return heads.whole(shards)


def send_layer_shard(group: TPGroup, tensors: LayerTensors, block_ids: torch.Tensor, layer: int) -> None:
    """A follower, at the same layer hook: its shard of (k, v, *scales)[block_ids] to rank 0."""
    _send(group, _pack([t.index_select(0, block_ids) for t in tensors]), 0, layer)


def scatter_blocks(group: TPGroup, heads: KVHeadMap, kv: KVCache, block_ids: torch.Tensor,
                   whole: Sequence[LayerTensors]) -> None:
    """Rank 0, after telling the followers (step message) to `receive_blocks` the same ids: each rank's
    kv heads of the whole-head `whole[layer]` tensors `[n, block_size, kv_heads, ...]` land in its cache
    blocks `block_ids`; rank 0 writes its own."""
    for rank in range(1, group.size):
        _send(group, _pack([t for layer in whole for t in heads.shard(layer, rank)]), rank, _LOAD_TAG)
    _write(kv, block_ids, [heads.shard(layer, 0) for layer in whole])


def receive_blocks(group: TPGroup, kv: KVCache, block_ids: torch.Tensor) -> None:
    """A follower: its shard of the blocks rank 0 scatters, written into its cache blocks `block_ids`."""
    n = block_ids.numel()
    shapes = [shard_shapes(layer_tensors(kv, i), kv.num_kv_heads) for i in range(kv.num_layers)]
    flat = _unpack(_recv(group, _nbytes([s for layer in shapes for s in layer], n), 0, _LOAD_TAG),
                   [s for layer in shapes for s in layer], n)
    per_layer = len(shapes[0])
    _write(kv, block_ids, [flat[i * per_layer:(i + 1) * per_layer] for i in range(kv.num_layers)])


def _write(kv: KVCache, block_ids: torch.Tensor, layers: Sequence[Sequence[torch.Tensor]]) -> None:
    for i, values in enumerate(layers):
        for cache, src in zip(layer_tensors(kv, i), values, strict=True):
            cache.index_copy_(0, block_ids, src.to(cache.device))
