"""Decode lookahead: an executor wrapping the graphed one that launches step n+1 before the host reads step n.

After a graphed decode step's tokens reach the host, the host spends ~0.3 ms (an H100 host, Llama-3-8B) on
postprocessing, scheduling, staging inputs and launching graphs, while the GPU idles: ~5% of a bs1 step. So
right after launching step n, the executor also launches the step the scheduler will most likely ask for next:
the same sequences one position on, each fed step n's sampled token on the device. When the scheduler's next
output is that step, or that step without some of its sequences (finished, aborted, preempted), the executor
takes its results instead of launching; anything else drops them (the GPU time is lost, nothing is read).

Why the results are exact: a lookahead row has the inputs the real step would have (token, position, block
table, sampling params; sampling noise depends on (seed, position) only), and rows never see each other. Its
KV write for position p+1 lands in the sequence's own slot, where the real step writes the same values; the
scheduler keeps a block ready for p+1 (SchedulerConfig.lookahead_tokens) so most steps qualify. Blocks freed
while a lookahead step runs are reused either by later kernels on the same stream (ordered after it) or by a
KV receiver, whose stream waits for the engine's stream when it is registered (kv_transfer/receiver.py).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.executor import Executor, FeatureSink, RunOutput, SampledStep, read_to_host
from engine.executors.graphed import GraphedExecutor
from engine.model import LayerHook
from engine.sampler import sample
from engine.scheduler import ScheduledChunk, SchedulerOutput


@dataclass(frozen=True)
class _Pending:
    chunks: tuple[ScheduledChunk, ...]
    step: SampledStep


def matching_rows(launched: Sequence[ScheduledChunk], asked: Sequence[ScheduledChunk]) -> list[int] | None:
    """Rows of `launched` that serve `asked`, if `asked` is `launched` with some chunks left out (same order,
    same sequence objects, same positions, one sampled token each); else None."""
    rows: list[int] = []
    i = 0
    for chunk in asked:
        while i < len(launched) and launched[i].seq is not chunk.seq:
            i += 1
        if (i == len(launched) or launched[i].start != chunk.start or chunk.num_new_tokens != 1
                or chunk.num_sampled != 1):
            return None
        rows.append(i)
        i += 1
    return rows


class DecodeLookahead(Executor):
    """Wraps the graphed executor: a graphed step also launches the step after it, unless others wait to
    join the batch (`SchedulerOutput.others_waiting`). At most one step in flight; counts what became of
    them (launched, used, dropped). Steps that replay no decode graph (prefill, mixed, hooked, verify steps)
    run through the graphed executor (verify graphs or eager) and drop whatever was launched ahead."""

    def __init__(self, graphed: GraphedExecutor) -> None:
        self.graphed_executor = graphed
        self.graphs = graphed.graphs
        self._pending: _Pending | None = None
        self.launched = self.used = self.dropped = 0

    def graphed(self, batch: SchedulerOutput, layer_hook: LayerHook | None = None) -> bool:
        return self.graphed_executor.graphed(batch, layer_hook)

    def keep_features(self, capture: FeatureSink) -> bool:
        # Kept features make every decode step a verify-graph step, which is never launched ahead.
        return self.graphed_executor.keep_features(capture)

    def launch(self, batch: SchedulerOutput, layer_hook: LayerHook | None = None) -> SampledStep | None:
        """This step's results on the device: the step launched ahead if it serves `batch`, else launched
        now. Launches nothing ahead (that is `execute`'s, after it queued this step's ids for the host)."""
        if not self.graphed(batch, layer_hook):
            self.drop()  # an eager step: whatever was launched ahead is stale
            return self.graphed_executor.launch(batch, layer_hook)
        step = self.claim(batch)
        return step if step is not None else self.graphed_executor.launch(batch)

    @torch.inference_mode()
    def execute(self, batch: SchedulerOutput, layer_hook: LayerHook | None = None) -> RunOutput:
        if not self.graphed(batch, layer_hook):
            return read_to_host(self.launch(batch, layer_hook))  # launch drops what was launched ahead
        step = self.claim(batch)
        if step is None:
            step = self.graphed_executor.launch(batch)
        if step is None:
            return RunOutput()
        # Queue this step's ids for the host before launching the next step behind them, then wait.
        pinned = torch.empty(step.token_ids.shape, dtype=step.token_ids.dtype, pin_memory=True)
        pinned.copy_(step.token_ids, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        if not batch.others_waiting:
            self.launch_next(batch.chunks, step)
        copied.synchronize()
        return step.to_output(pinned.tolist())

    def claim(self, out: SchedulerOutput) -> SampledStep | None:
        """The in-flight lookahead's results for `out`, rows in out's order; None (and dropped) if it does
        not serve `out`. Either way nothing is in flight afterwards."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        rows = matching_rows(pending.chunks, out.chunks)
        if rows is None or not rows:
            self.dropped += 1
            return None
        self.used += 1
        step = pending.step
        if len(rows) == len(pending.chunks):
            return step
        index = torch.tensor(rows).to(step.token_ids.device, non_blocking=True)
        return SampledStep(step.token_ids[index], tuple(step.seqs[i] for i in rows), step.last_hidden[index])

    def pending_seqs(self) -> tuple | None:
        """The sequences of the step in flight (what the next schedule should ask for), or None."""
        return None if self._pending is None else tuple(c.seq for c in self._pending.chunks)

    def drop(self) -> None:
        if self._pending is not None:
            self._pending = None
            self.dropped += 1

    def launch_next(self, chunks: Sequence[ScheduledChunk], step: SampledStep) -> bool:
        """After decode step `chunks` was launched (`step`: its device results, one row per chunk), launch
        the step that follows it; False if that step cannot be staged (a block or the graph table is full)."""
        following = self._following(chunks)
        if following is None or len(step.seqs) != len(chunks):
            return False
        hidden, logits = self.graphs.run(following, token_ids=step.token_ids)
        seqs = tuple(c.seq for c in following)
        # The sampled token's index in its sequence, as the real step would pass it (seq.num_tokens then).
        token_ids = sample(logits, [s.sampling for s in seqs], [c.start + 1 for c in following])
        self._pending = _Pending(following, SampledStep(token_ids, seqs, hidden.clone()))
        self.launched += 1
        return True

    def _following(self, chunks: Sequence[ScheduledChunk]) -> tuple[ScheduledChunk, ...] | None:
        if not chunks or not self.graphs.fits(chunks):
            return None
        block_size = self.graphs.kv_cache.block_size
        following = []
        for chunk in chunks:
            pos = chunk.start + 1
            if (chunk.num_sampled != 1 or pos >= self.graphs.max_model_len
                    or pos >= len(chunk.seq.block_table) * block_size
                    or pos // block_size + 1 > self.graphs.table_width):
                return None
            following.append(ScheduledChunk(chunk.seq, pos, 1, 1))
        return tuple(following)
