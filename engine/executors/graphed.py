"""Graphed executor (CUDA): decode-only batches that fit a bucket replay CUDA graphs; the rest run eagerly."""
from __future__ import annotations

import torch

from engine.cuda_graphs import DecodeGraphRunner
from engine.executor import Executor, SampledStep
from engine.executors.eager import EagerExecutor
from engine.model import LayerHook, LlamaModel
from engine.sampler import sample
from engine.scheduler import SchedulerOutput


def graph_safe_kernels(model: LlamaModel, device: torch.device) -> bool:
    """Whether the model's kernels are ones a CUDA graph can replay (KernelRegistry.graph_safe): the torch
    references read host-side spans and cannot skip padded rows, so they never go into a graph."""
    return device.type == "cuda" and model.kernels.graph_safe


class GraphedExecutor(Executor):
    """Replays `graphs` for batches of one new token per sequence that fit a bucket and need no per-layer
    host hook; everything else — prefill and mixed steps, hooked steps, and for now verify steps (several
    tokens per sequence) — goes to the eager executor. A graphed step syncs nowhere until `execute` reads
    the sampled ids (inputs go up by one non-blocking copy from pinned memory)."""

    def __init__(self, graphs: DecodeGraphRunner, eager: EagerExecutor) -> None:
        self.graphs = graphs
        self.eager = eager

    def graphed(self, batch: SchedulerOutput, layer_hook: LayerHook | None = None) -> bool:
        """Whether this batch replays a decode graph."""
        return layer_hook is None and self.graphs.fits(batch.chunks)

    def launch(self, batch: SchedulerOutput, layer_hook: LayerHook | None = None) -> SampledStep | None:
        if not self.graphed(batch, layer_hook):
            return self.eager.launch(batch, layer_hook)
        hidden, logits = self.graphs.run(batch.chunks)
        rows = [i for i, c in enumerate(batch.chunks) if c.num_sampled]
        if not rows:
            return None
        if len(rows) == len(batch.chunks):
            last = hidden.clone()  # graph outputs are overwritten by the next replay
        else:  # 1-token chunks mid-prompt ride along but do not sample
            index = torch.tensor(rows).to(hidden.device, non_blocking=True)
            last, logits = hidden[index], logits[index]
        seqs = tuple(batch.chunks[i].seq for i in rows)
        token_ids = sample(logits, [s.sampling for s in seqs], [s.num_tokens for s in seqs])
        return SampledStep(token_ids, seqs, last)
