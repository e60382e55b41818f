"""Graphed executor (CUDA): decode and verify batches that fit replay CUDA graphs; the rest run eagerly."""
from __future__ import annotations

import torch

from engine.cuda_graphs import DecodeGraphRunner
from engine.executor import Executor, FeatureSink, SampledStep
from engine.executors.batch_inputs import SamplingRows
from engine.executors.eager import EagerExecutor
from engine.executors.verify_sampling import sample_rows
from engine.model import LayerHook, LlamaModel
from engine.sampler import sample
from engine.scheduler import SchedulerOutput
from engine.verify_graphs import VerifyGraphRunner


def graph_safe_kernels(model: LlamaModel, device: torch.device) -> bool:
    """Whether the model's kernels are ones a CUDA graph can replay (KernelRegistry.graph_safe): the torch
    references read host-side spans and cannot skip padded rows, so they never go into a graph."""
    return device.type == "cuda" and model.kernels.graph_safe


class GraphedExecutor(Executor):
    """Replays `graphs` for batches of one new token per sequence that fit a bucket and need no per-layer
    host hook; with `verify` (speculation on), batches of up to k + 1 new tokens per sequence replay its
    graphs — verify steps, and every decode step once the draft head's features are kept (`keep_features`:
    only the verify graphs output them). Everything else — prefill and mixed steps, tree verifies, hooked
    steps — goes to the eager executor. A graphed step syncs nowhere until `execute` reads the sampled ids
    (inputs go up by one non-blocking copy from pinned memory)."""

    def __init__(self, graphs: DecodeGraphRunner, eager: EagerExecutor,
                 verify: VerifyGraphRunner | None = None) -> None:
        self.graphs = graphs
        self.eager = eager
        self.verify = verify
        self.features: FeatureSink | None = None

    def graphed(self, batch: SchedulerOutput, layer_hook: LayerHook | None = None) -> bool:
        """Whether this batch replays a decode graph (one token per sequence, no features kept)."""
        return layer_hook is None and self.features is None and self.graphs.fits(batch.chunks)

    def verify_graphed(self, batch: SchedulerOutput, layer_hook: LayerHook | None = None) -> bool:
        """Whether this batch replays a verify graph."""
        return (layer_hook is None and self.verify is not None and bool(batch.chunks) and not batch.has_tree
                and not self.graphed(batch) and self.verify.shape_for(batch.chunks) is not None)

    def keep_features(self, capture: FeatureSink) -> bool:
        if self.verify is None or self.verify.feature_layers != tuple(capture.layers):
            return False
        self.features = capture
        return True

    def launch(self, batch: SchedulerOutput, layer_hook: LayerHook | None = None) -> SampledStep | None:
        if self.graphed(batch, layer_hook):
            return self._launch_decode(batch)
        if self.verify_graphed(batch, layer_hook):
            return self._launch_verify(batch)
        return self.eager.launch(batch, layer_hook)

    def _launch_decode(self, batch: SchedulerOutput) -> SampledStep | None:
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

    def _launch_verify(self, batch: SchedulerOutput) -> SampledStep | None:
        """The eager executor's step (same rows, same sampling) from the verify graph's outputs."""
        hidden, logits, features = self.verify.run(batch.chunks)
        if self.features is not None:
            self.features.put(features.clone())  # graph outputs are overwritten by the next replay
        rows = SamplingRows.of(batch.chunks)
        if not rows.rows:
            return None
        if len(rows.rows) != hidden.shape[0]:  # some chunk samples fewer rows than it computes
            logits = logits[torch.tensor(rows.rows).to(hidden.device, non_blocking=True)]
        token_ids = sample_rows(logits, rows)  # verify chunks with draft distributions: rejection-sampled
        last = hidden[torch.tensor(rows.last_rows).to(hidden.device, non_blocking=True)]  # a copy
        return SampledStep(token_ids, rows.seqs, last, None if rows.one_each else rows.num_sampled)
