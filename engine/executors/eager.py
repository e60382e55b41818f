"""Eager executor: any batch, one plain forward over the paged cache, logits of every sampled position."""
from __future__ import annotations

import torch

from engine.executor import Executor, SampledStep
from engine.executors.batch_inputs import SamplingRows, prepare_inputs
from engine.executors.verify_sampling import sample_rows
from engine.kv_cache import KVCache
from engine.model import LayerHook, LlamaModel
from engine.scheduler import SchedulerOutput
from engine.spec.tree_verify import walk_trees


class EagerExecutor(Executor):
    """Runs any batch (prefill chunks, decode, verify positions, tree verifies, a layer hook) as one forward
    call."""

    def __init__(self, model: LlamaModel, kv_cache: KVCache, device: torch.device) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = device

    def launch(self, batch: SchedulerOutput, layer_hook: LayerHook | None = None) -> SampledStep | None:
        """Syncs once on the host → device metadata upload (the graphed path does not)."""
        if not batch.chunks:
            return None
        ids, pos, meta = prepare_inputs(batch.chunks, self.kv_cache.block_size, self.device)
        hidden = self.model(ids, pos, meta, self.kv_cache, layer_hook)
        rows = SamplingRows.of(batch.chunks)
        if not rows.rows:
            return None
        # One sampling row (bs1 decode) is a view; several are one gather.
        if len(rows.rows) == 1:
            selected = hidden[rows.rows[0]:rows.rows[0] + 1]
        else:
            selected = hidden[torch.tensor(rows.rows).to(hidden.device, non_blocking=True)]
        logits = self.model.compute_logits(selected)
        token_ids = sample_rows(logits, rows)  # verify chunks with draft distributions: rejection-sampled
        if batch.has_tree:  # tree verifies: walked, their paths' KV moved into place
            token_ids = walk_trees(logits, rows.chunks, rows.num_sampled, token_ids, self.kv_cache)
        if rows.one_each:
            return SampledStep(token_ids, rows.seqs, selected)
        last = hidden[torch.tensor(rows.last_rows).to(hidden.device, non_blocking=True)]
        return SampledStep(token_ids, rows.seqs, last, rows.num_sampled)
