"""Decode lookahead: launch step n+1 before the host reads step n's tokens; the GPU never waits for the host.

After a graphed decode step's tokens reach the host, the host spends ~0.3 ms (an H100 host, Llama-3-8B) on
postprocessing, scheduling, staging inputs and launching graphs, while the GPU idles: ~5% of a bs1 step. So
right after launching step n, the runner also launches the step the scheduler will most likely ask for next:
the same sequences one position on, each fed step n's sampled token on the device. When the scheduler's next
output is that step, or that step without some of its sequences (finished, aborted, preempted), the runner
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

from engine.cuda_graphs import DecodeGraphRunner
from engine.sampler import sample
from engine.scheduler import ScheduledChunk, SchedulerOutput


@dataclass(frozen=True)
class SampledStep:
    """A step's results still on the device: what the runner turns into host ints with its one sync."""

    token_ids: torch.Tensor  # [N] int64, one per sampling sequence
    seqs: tuple  # the sampling sequences (engine.sequence.Sequence), in row order
    last_hidden: torch.Tensor  # [N, H], owned by the caller (not a view of graph outputs)


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
                or not chunk.sample):
            return None
        rows.append(i)
        i += 1
    return rows


class DecodeLookahead:
    """At most one lookahead step in flight; counts what became of them (launched, used, dropped)."""

    def __init__(self, graphs: DecodeGraphRunner) -> None:
        self.graphs = graphs
        self._pending: _Pending | None = None
        self.launched = self.used = self.dropped = 0

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

    def launch(self, chunks: Sequence[ScheduledChunk], step: SampledStep) -> bool:
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
            if (not chunk.sample or pos >= self.graphs.max_model_len
                    or pos >= len(chunk.seq.block_table) * block_size
                    or pos // block_size + 1 > self.graphs.table_width):
                return None
            following.append(ScheduledChunk(chunk.seq, pos, 1, sample=True))
        return tuple(following)
