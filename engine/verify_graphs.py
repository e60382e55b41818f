"""CUDA graphs for verify steps: up to `width` query rows per sequence (k drafts + 1), draft features out."""
from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from engine.cuda_graphs import decode_buckets, pick_bucket
from engine.graph_step import (
    INPUT_FIELDS,
    DecodeBatchError,
    DecodeInputs,
    GraphedStep,
    StepOutputs,
    blocks_needed,
    capture_step,
    input_layout,
)
from engine.kv_cache import KVCache
from engine.model import LlamaModel
from engine.scheduler import ScheduledChunk

logger = logging.getLogger(__name__)


def verify_widths(k: int) -> tuple[int, ...]:
    """Captured query rows per sequence for verify steps of up to k drafts: 2, 4, 8, … below k + 1, then
    k + 1. Adaptive k sends steps of every draft count; a step runs in the narrowest width that holds its
    longest chunk, so at most half of a width is padding and k = 5 needs 3 widths, not 5."""
    if k < 1:
        raise ValueError(f"need k >= 1 drafts, got {k}")
    widths, width = [], 2
    while width < k + 1:
        widths.append(width)
        width *= 2
    widths.append(k + 1)
    return tuple(widths)


class VerifyStager:
    """Host side of one (bucket, width): fills a (pinned, on CUDA) int32 buffer from a step's chunks.

    Rows are packed: chunk i's tokens follow chunk i-1's (query_start_loc is their running sum), exactly the
    eager layout, so the sampling rows of `SamplingRows.of(chunks)` index the graph's outputs directly.
    Rows past the last chunk's are padding (token 0, position 0, no KV slot), sequences past the last chunk
    have no rows and an empty context: the attention kernel skips them and their rows are never read.
    """

    def __init__(self, bucket: int, width: int, table_width: int, block_size: int,
                 pin_memory: bool = False) -> None:
        self.bucket = bucket
        self.width = width
        self.table_width = table_width
        self.block_size = block_size
        _, size = input_layout(bucket, table_width, bucket * width)
        self.buffer = torch.zeros(size, dtype=torch.int32, pin_memory=pin_memory)
        self.inputs = DecodeInputs.views(self.buffer, bucket, table_width, bucket * width)
        self._np = {name: getattr(self.inputs, name).numpy() for name in INPUT_FIELDS}
        self._np["slot_mapping"][:] = -1  # until filled, every row is padding

    def fill(self, chunks: Sequence[ScheduledChunk]) -> int:
        """Write one step (chunk order, each chunk's tokens in position order); returns the real rows."""
        if len(chunks) > self.bucket:
            raise DecodeBatchError(f"{len(chunks)} sequences do not fit a verify bucket of {self.bucket}")
        bs = self.block_size
        ids, positions, slots, lens, starts = [], [], [], [], [0]
        tables = self._np["block_tables"]
        for row, chunk in enumerate(chunks):
            n, start = chunk.num_new_tokens, chunk.start
            if not 1 <= n <= self.width:
                raise DecodeBatchError(f"{chunk.seq.request_id}: {n} new tokens, not 1..{self.width}")
            end = start + n
            table = chunk.seq.block_table
            needed = blocks_needed(chunk, end, bs, self.table_width)
            tables[row, :needed] = table[:needed]
            ids.extend(chunk.token_ids)
            positions.extend(range(start, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            lens.append(end)
            starts.append(starts[-1] + n)
        total, n = len(ids), len(chunks)
        self._np["input_ids"][:total] = ids
        self._np["positions"][:total] = positions
        self._np["slot_mapping"][:total] = slots
        self._np["input_ids"][total:] = 0
        self._np["positions"][total:] = 0
        self._np["slot_mapping"][total:] = -1
        self._np["seq_lens"][:n] = lens
        self._np["seq_lens"][n:] = 0
        self._np["query_start_loc"][:n + 1] = starts
        self._np["query_start_loc"][n + 1:] = total  # no rows for padded sequences
        return total


class VerifyGraphRunner:
    """Replays a (bucket, width)'s CUDA graphs: embed → layers → final norm → fp32 logits of every row, and,
    when `feature_layers` are given, those layers' outputs (the residual stream h + residual, what
    `LayerCapture` keeps on the eager path) concatenated in that order: the draft head's features.

    Attention runs the kernel an eager verify step of the same row count runs (the prefill kernel over every
    sequence's rows, causal within them). Graph memory lives in `pool` (shared with the decode graphs: the
    two never run at once and callers copy what they keep before the next replay of either). Everything is
    captured at start-up (`capture_all`), before the draft head's forward hooks exist: a capture with hooks
    on would run them inside the graph once and never again.
    """

    def __init__(self, model: LlamaModel, kv_cache: KVCache, max_num_seqs: int, max_model_len: int,
                 device: torch.device | str, k: int, feature_layers: Sequence[int] = (),
                 pool: object | None = None) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = torch.device(device)
        self.buckets = decode_buckets(max_num_seqs)
        self.widths = verify_widths(k)
        self.max_model_len = max_model_len
        self.table_width = min(-(-max_model_len // kv_cache.block_size), kv_cache.num_blocks)
        self.feature_layers = tuple(feature_layers)
        if any(not 0 <= i < len(model.layers) for i in self.feature_layers):
            raise ValueError(f"feature layers {self.feature_layers} outside the model's {len(model.layers)}")
        self._pool = pool
        self._captured: dict[tuple[int, int], GraphedStep[VerifyStager]] = {}

    @property
    def captured(self) -> tuple[tuple[int, int], ...]:
        """(bucket, width) pairs captured so far."""
        return tuple(sorted(self._captured))

    def shape_for(self, chunks: Sequence[ScheduledChunk]) -> tuple[int, int] | None:
        """The (bucket, width) serving this step, or None (run it eagerly): too many sequences, a chunk
        wider than k + 1 rows (a prompt chunk), or a context past the captured block-table width."""
        bucket = pick_bucket(len(chunks), self.buckets)
        if bucket is None:
            return None
        widest = max(c.num_new_tokens for c in chunks)
        width = next((w for w in self.widths if w >= widest), None)
        if width is None or min(c.num_new_tokens for c in chunks) < 1:
            return None
        bs = self.kv_cache.block_size
        if any(-(-(c.start + c.num_new_tokens) // bs) > self.table_width for c in chunks):
            return None
        return bucket, width

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Capture every (bucket, width) now, largest first (smaller graphs then reuse the pool's memory)."""
        for bucket in sorted(self.buckets, reverse=True):
            for width in sorted(self.widths, reverse=True):
                self._entry(bucket, width)
        logger.info("captured verify CUDA graphs for batch sizes %s × query widths %s%s", self.buckets,
                    self.widths, f", features of layers {self.feature_layers}" if self.feature_layers else "")

    def run(self, chunks: Sequence[ScheduledChunk]) -> StepOutputs:
        """(hidden [R, H], logits [R, V] fp32, features [R, F·H] or None) of the step's R packed rows, without
        a host sync. Views of the graph's outputs: valid until the next replay of any graph in the pool."""
        if not torch.is_inference_mode_enabled():  # the buffers are inference tensors
            with torch.inference_mode():
                return self.run(chunks)
        shape = self.shape_for(chunks)
        if shape is None:
            raise DecodeBatchError(f"a step of {len(chunks)} chunks fits no verify graph "
                                   f"{self.buckets} × {self.widths}")
        entry = self._entry(*shape)
        entry.wait_staging_free()
        rows = entry.stager.fill(chunks)
        hidden, logits, features = entry.launch(rows)
        return hidden[:rows], logits[:rows], None if features is None else features[:rows]

    def _entry(self, bucket: int, width: int) -> GraphedStep[VerifyStager]:
        entry = self._captured.get((bucket, width))
        if entry is None:
            entry = self._captured[(bucket, width)] = self._capture(bucket, width)
        return entry

    def _capture(self, bucket: int, width: int) -> GraphedStep[VerifyStager]:
        stager = VerifyStager(bucket, width, self.table_width, self.kv_cache.block_size,
                              pin_memory=self.device.type == "cuda")
        # max_query_len = width and T = bucket · width: the attention runs the prefill kernel alone over
        # every sequence (its grid covers `width` rows each; shorter chunks and padded sequences mask off).
        entry, self._pool = capture_step(self.model, self.kv_cache, stager, rows=bucket * width,
                                         max_query_len=width, max_seq_len=self.max_model_len,
                                         device=self.device, pool=self._pool,
                                         feature_layers=self.feature_layers)
        return entry
