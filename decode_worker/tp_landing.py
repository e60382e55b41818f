"""Where a TP decode worker's incoming KV lands before each rank takes its kv heads."""
from __future__ import annotations

import torch

from contracts.transfer import TransferTarget
from engine.kv_cache import KVCache
from kv_transfer.layout import KVLayout


def landing_buffers(kv: KVCache, layout: KVLayout, target: TransferTarget) -> list[tuple[torch.Tensor, ...]]:
    """Whole-head tensors (values, then scales) per layer for the transfer's blocks: at TP > 1 rank 0's cache
    holds only its kv heads, so frames land here and are scattered to the ranks once the transfer is done."""
    spec = layout.spec
    n = target.num_blocks(layout)
    values = (n, *spec.storage_block_shape)
    scales = [(n, *shape) for shape in spec.scale_shapes().values()]
    return [(torch.zeros(values, dtype=kv.dtype, device=kv.device),
             torch.zeros(values, dtype=kv.dtype, device=kv.device),
             *(torch.zeros(shape, dtype=kv.scales[name][0].dtype, device=kv.device)
               for name, shape in zip(spec.scale_shapes(), scales, strict=True)))
            for _ in range(kv.num_layers)]
