"""CPU flat executor: one-sequence decode steps run FlatDecoder; the rest eagerly."""
from __future__ import annotations

import torch

from engine.cpu_decode import FlatDecoder
from engine.executor import Executor, SampledStep
from engine.executors.eager import EagerExecutor
from engine.model import LayerHook
from engine.sampler import sample
from engine.scheduler import SchedulerOutput


class CpuFlatExecutor(Executor):
    """bs1 decode on CPU through `flat` (the model's own weights, the same math in fewer torch calls);
    several sequences, prefill or verify chunks, a layer hook or a short block table go to `eager`."""

    def __init__(self, flat: FlatDecoder, eager: EagerExecutor) -> None:
        self.flat = flat
        self.eager = eager

    def flat_hidden(self, batch: SchedulerOutput, layer_hook: LayerHook | None = None) -> torch.Tensor | None:
        """Hidden state [1, H] of a bs1 decode step run flat; None (nothing computed) if it does not fit."""
        if layer_hook is not None or len(batch.chunks) != 1:
            return None
        chunk = batch.chunks[0]
        if chunk.num_new_tokens != 1:
            return None
        seq, position = chunk.seq, chunk.start
        if len(seq.block_table) <= position // self.eager.kv_cache.block_size:
            return None  # the eager path reports a short block table
        return self.flat(seq.token_ids[position], position, seq.block_table)

    def launch(self, batch: SchedulerOutput, layer_hook: LayerHook | None = None) -> SampledStep | None:
        hidden = self.flat_hidden(batch, layer_hook)
        if hidden is None:
            return self.eager.launch(batch, layer_hook)
        seq = batch.chunks[0].seq
        if not batch.chunks[0].num_sampled:
            return None
        logits = self.eager.model.compute_logits(hidden)
        return SampledStep(sample(logits, [seq.sampling], [seq.num_tokens]), (seq,), hidden)
