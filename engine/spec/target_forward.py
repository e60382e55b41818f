"""The plain target over a few sequences with a private paged cache, capturing the draft head's features."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from contracts.kv_cache_spec import KVCacheSpec
from engine.kv_cache import KVCache, dtype_name
from engine.model import LlamaModel
from kernels.attention.metadata import AttentionMetadata, SeqSpan


def default_feature_layers(num_layers: int) -> tuple[int, int, int]:
    """(low, middle, high) layer indices whose outputs the head fuses (EAGLE-3's choice: 2, L/2, L-3)."""
    return min(2, num_layers - 1), num_layers // 2, max(num_layers - 3, 0)


class LayerCapture:
    """Forward hooks on chosen decoder layers: each forward's layer outputs (the residual stream) are kept.

    A layer returns (h, residual) with the residual add deferred to the next norm, so its output stream is
    h + residual. `take()` returns [T, len(layers) * H] in `layers` order and clears what was kept.
    """

    def __init__(self, model: LlamaModel, layers: Sequence[int]) -> None:
        self.layers = tuple(layers)
        self._kept: dict[int, torch.Tensor] = {}
        self._given: torch.Tensor | None = None
        self._handles = []
        for i in sorted(set(self.layers)):
            self._handles.append(model.layers[i].register_forward_hook(self._hook(i)))

    def _hook(self, index: int):
        def keep(_module, _args, output: tuple[torch.Tensor, torch.Tensor]) -> None:
            h, residual = output
            self._kept[index] = h + residual
        return keep

    def put(self, features: torch.Tensor) -> None:
        """The rows a graphed step computed itself ([T, len(layers) * H], engine/verify_graphs.py: graph
        replays run no hooks): the next `take()` returns them."""
        self._given = features

    def keep(self, index: int, stream: torch.Tensor) -> None:
        """Layer `index`'s output stream from a path that runs no module hooks (the CPU flat executor)."""
        if index in self.layers:
            self._kept[index] = stream

    def take(self) -> torch.Tensor:
        given, self._given = self._given, None
        if given is not None:
            self._kept.clear()
            return given
        missing = [i for i in self.layers if i not in self._kept]
        if missing:
            raise RuntimeError(f"no forward ran through layers {missing} since the last take()")
        out = torch.cat([self._kept[i] for i in self.layers], dim=-1)
        self._kept.clear()
        return out

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class TargetForward:
    """Runs the target over up to `num_slots` sequences of at most `max_len` tokens each.

    Slot b owns consecutive KV blocks, so attention reads each context as one slice. A forward names, per
    slot, the position of its first new token; positions past it that were written earlier (rejected drafts)
    are simply overwritten, which is the whole of rollback here.
    """

    def __init__(self, model: LlamaModel, num_slots: int, max_len: int, block_size: int = 16,
                 feature_layers: Sequence[int] | None = None) -> None:
        config = model.config
        weight = model.embed_tokens.weight
        self.model = model
        self.block_size = block_size
        self.blocks_per_slot = -(-max_len // block_size)
        self.max_len = self.blocks_per_slot * block_size
        spec = KVCacheSpec(block_size, config.num_kv_heads, config.head_dim, dtype_name(weight.dtype))
        self.kv = KVCache(spec, config.num_layers, num_slots * self.blocks_per_slot, weight.device)
        layers = default_feature_layers(config.num_layers) if feature_layers is None else feature_layers
        self.capture = LayerCapture(model, layers)

    @torch.no_grad()
    def forward(self, rows: Sequence[tuple[int, int, Sequence[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
        """rows: (slot, start position, token ids) per sequence → (final-normed hidden [T, H], features
        [T, F·H]), rows in the order given."""
        spans, slots, ids, positions = [], [], [], []
        for slot, start, tokens in rows:
            end = start + len(tokens)
            if end > self.max_len:
                raise ValueError(f"slot {slot}: {end} tokens exceed max_len {self.max_len}")
            first_block = slot * self.blocks_per_slot
            num_blocks = -(-end // self.block_size)
            block_ids = tuple(range(first_block, first_block + num_blocks))
            spans.append(SeqSpan(len(ids), len(tokens), end, block_ids, first_block * self.block_size))
            slots.extend(first_block * self.block_size + p for p in range(start, end))
            ids.extend(tokens)
            positions.extend(range(start, end))
        device = self.model.embed_tokens.weight.device
        meta = AttentionMetadata.from_spans(spans, slots, self.block_size, device)
        hidden = self.model(torch.tensor(ids, device=device), torch.tensor(positions, device=device),
                            meta, self.kv)
        return hidden, self.capture.take()

    def close(self) -> None:
        self.capture.close()
