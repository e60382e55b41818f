"""CPU flat executor: small decode batches, split-fused steps and bs1 verifies run flat (fewer torch calls);
the rest eagerly."""
from __future__ import annotations

import torch

from engine.cpu_decode import FlatDecoder
from engine.executor import Executor, SampledStep
from engine.executors.batch_inputs import SamplingRows
from engine.executors.cpu_fused import FlatFusedStep
from engine.executors.cpu_verify import FlatRows, LayerKeep, sample_chain
from engine.executors.eager import EagerExecutor
from engine.executors.verify_sampling import sample_rows
from engine.model import LayerHook
from engine.sampler import sample
from engine.scheduler import ScheduledChunk, SchedulerOutput
from engine.spec.tree_verify import walk_tree

# Decode-only steps of up to this many sequences (the default max_num_seqs) run flat; larger ones run the
# eager forward. The flat step still beat it at 32 (1.26x; docs/benchmarks.md, "Flat CPU decode of small
# batches"); past 32 it is not measured.
MAX_FLAT_BATCH = 32


class CpuFlatExecutor(Executor):
    """Decode steps of 1..MAX_FLAT_BATCH sequences on CPU through `flat` (the model's own weights, the same
    math in fewer torch calls), split-fused steps (1..MAX_FLAT_BATCH decodes beside prompt chunks) through
    `fused` over the same weights, and bs1 verify chunks (the last token + drafts, chains or trees) over
    consecutive KV blocks through FlatRows; larger batches, prefill-only steps, batches with verify chunks
    beside others, a layer hook, a short block table or a verify chunk over scattered blocks go to `eager`
    (FlatDecoder gathers scattered blocks itself).

    `keep`: set by a draft head's speculator (`feed`); flat steps then hand it each layer's output, as the
    head's forward hooks would see it on the eager path, so capturing steps need not leave the flat path.
    """

    def __init__(self, flat: FlatDecoder, eager: EagerExecutor) -> None:
        self.flat = flat
        self.rows = FlatRows(flat)
        # None: split-fused steps run eager (what `bench.engine.fused_steps --fused-path eager` times).
        self.fused: FlatFusedStep | None = FlatFusedStep(flat, MAX_FLAT_BATCH)
        self.eager = eager
        self.keep: LayerKeep | None = None

    def feed(self, keep: LayerKeep | None) -> None:
        self.keep = keep

    def _flat_chunk(self, batch: SchedulerOutput,
                    layer_hook: LayerHook | None) -> tuple[ScheduledChunk, list[int]] | None:
        """(the chunk, the KV blocks its rows use) of a bs1 step whose every row samples (decode or verify);
        None for anything the eager path runs."""
        if layer_hook is not None or len(batch.chunks) != 1:
            return None
        chunk = batch.chunks[0]
        if chunk.num_sampled != chunk.num_new_tokens:
            return None  # prefill chunks: the eager path (paged attention over the prompt)
        seq, block_size = chunk.seq, self.eager.kv_cache.block_size
        num_blocks = (chunk.start + chunk.num_new_tokens - 1) // block_size + 1
        blocks = seq.block_table[:num_blocks]
        if len(blocks) < num_blocks:
            return None  # the eager path reports a short block table
        return chunk, blocks

    def flat_hidden(self, batch: SchedulerOutput, layer_hook: LayerHook | None = None) -> torch.Tensor | None:
        """Hidden state [1, H] of a bs1 decode step run flat; None (nothing computed) if it does not fit."""
        found = self._flat_chunk(batch, layer_hook)
        if found is None or found[0].num_new_tokens != 1:
            return None
        chunk, blocks = found
        return self.flat(chunk.seq.token_ids[chunk.start], chunk.start, blocks)

    def _decode_batch(self, batch: SchedulerOutput,
                      layer_hook: LayerHook | None) -> list[tuple[ScheduledChunk, list[int]]] | None:
        """(chunk, its KV blocks) per sequence of a decode-only step of 2..MAX_FLAT_BATCH sequences (one
        token each); None for anything else (bs1 steps take _flat_chunk)."""
        chunks = batch.chunks
        if layer_hook is not None or self.keep is not None or not 2 <= len(chunks) <= MAX_FLAT_BATCH:
            return None  # a capturing draft head's features come from FlatRows or the eager forward
        block_size, found = self.eager.kv_cache.block_size, []
        for chunk in chunks:
            if chunk.num_new_tokens != 1 or chunk.num_sampled != 1:
                return None
            blocks = chunk.seq.block_table[:chunk.start // block_size + 1]
            if len(blocks) * block_size <= chunk.start:
                return None  # the eager path reports a short block table
            found.append((chunk, blocks))
        return found

    def launch(self, batch: SchedulerOutput, layer_hook: LayerHook | None = None) -> SampledStep | None:
        decodes = self._decode_batch(batch, layer_hook)
        if decodes is not None:  # B sequences, one token each: one [B, K] product per projection
            chunks, block_tables = zip(*decodes, strict=True)
            seqs = tuple(chunk.seq for chunk in chunks)
            hidden = self.flat.decode([chunk.seq.token_ids[chunk.start] for chunk in chunks],
                                      [chunk.start for chunk in chunks], block_tables)
            logits = self.flat.logits(hidden)
            token_ids = sample(logits, [seq.sampling for seq in seqs], [seq.num_tokens for seq in seqs])
            return SampledStep(token_ids, seqs, hidden)
        # Split-fused: not while a draft head captures features (the eager forward's hooks see its rows).
        if self.fused is not None and layer_hook is None and self.keep is None:
            plan = self.fused.plan(batch)
            if plan is not None:
                return self.fused.launch(batch, plan)
        found = self._flat_chunk(batch, layer_hook)
        if found is None:
            return self.eager.launch(batch, layer_hook)
        chunk, blocks = found
        seq, n = chunk.seq, chunk.num_new_tokens
        if n == 1 and self.keep is None:  # the plain bs1 step: FlatDecoder, over any blocks
            hidden = self.flat(seq.token_ids[chunk.start], chunk.start, blocks)
            logits = self.eager.model.compute_logits(hidden)
            return SampledStep(sample(logits, [seq.sampling], [seq.num_tokens]), (seq,), hidden)
        if blocks != list(range(blocks[0], blocks[0] + len(blocks))):
            return self.eager.launch(batch, layer_hook)  # FlatRows reads its context as one slice
        first_slot = blocks[0] * self.eager.kv_cache.block_size
        hidden = self.rows(chunk.token_ids, chunk.start, first_slot, self.keep, chunk.tree)
        compute_logits = self.eager.model.compute_logits
        if chunk.tree is not None:  # walked (the path's LM-head rows only, greedy), the path's KV moved
            ids = walk_tree(chunk, lambda r: compute_logits(hidden[r:r + 1])[0], self.eager.kv_cache)
            token_ids = torch.tensor(ids)
        elif chunk.draft_probs is not None:  # sampled drafts: rejection-sampled over all rows together
            token_ids = sample_rows(compute_logits(hidden), SamplingRows.of(batch.chunks))
        else:
            token_ids = torch.tensor(sample_chain(compute_logits(hidden), chunk))
        return SampledStep(token_ids, (seq,), hidden[-1:], None if n == 1 else (n,))
