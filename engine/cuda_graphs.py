"""CUDA graphs for decode steps: static inputs per bucketed batch size, padded rows that write nothing."""
from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from engine.graph_step import (
    INPUT_FIELDS,
    DecodeBatchError,
    DecodeInputs,
    GraphedStep,
    blocks_needed,
    capture_step,
    input_layout,
)
from engine.kv_cache import KVCache
from engine.model import LlamaModel
from engine.scheduler import ScheduledChunk

logger = logging.getLogger(__name__)


def decode_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """Captured batch sizes: powers of two below max_num_seqs, then max_num_seqs itself (every decode fits).

    Padding costs little at decode: the step reads every weight once whatever the batch, and padded rows
    attend to nothing.
    """
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    sizes = []
    size = 1
    while size < max_num_seqs:
        sizes.append(size)
        size *= 2
    sizes.append(max_num_seqs)
    return tuple(sizes)


def pick_bucket(batch: int, buckets: Sequence[int]) -> int | None:
    """Smallest bucket >= batch; None if the batch is empty or larger than every bucket (run eagerly)."""
    if batch < 1:
        return None
    return next((b for b in sorted(buckets) if b >= batch), None)


class DecodeStager:
    """Host side of one bucket: fills a (pinned, on CUDA) int32 buffer from decode chunks, padding the rest.

    Block-table rows are written incrementally: a running sequence's table only grows (the scheduler swaps in
    a new list when it frees blocks), so a row still owned by the same list needs only its new entries.
    """

    def __init__(self, bucket: int, table_width: int, block_size: int, pin_memory: bool = False) -> None:
        self.bucket = bucket
        self.table_width = table_width
        self.block_size = block_size
        _, size = input_layout(bucket, table_width)
        self.buffer = torch.zeros(size, dtype=torch.int32, pin_memory=pin_memory)
        self.inputs = DecodeInputs.views(self.buffer, bucket, table_width)
        self._np = {name: getattr(self.inputs, name).numpy() for name in INPUT_FIELDS}
        self._np["query_start_loc"][:] = np.arange(bucket + 1, dtype=np.int32)
        self._np["slot_mapping"][:] = -1  # until filled, every row is padding
        # Per row: the block-table list last written there and how many of its entries the buffer holds.
        self._rows: list[tuple[list[int] | None, int]] = [(None, 0)] * bucket

    def fill(self, chunks: Sequence[ScheduledChunk], ids_on_device: bool = False) -> int:
        """Write one decode step (one new token per chunk, rows in chunk order); returns the real rows.

        ids_on_device: the input ids are not on the host yet (decode lookahead): write 0s, the caller copies
        the ids into the device buffer after the staging copy."""
        n = len(chunks)
        if n > self.bucket:
            raise DecodeBatchError(f"{n} sequences do not fit a decode bucket of {self.bucket}")
        bs = self.block_size
        ids, positions, slots, lens = [], [], [], []
        tables = self._np["block_tables"]
        for row, chunk in enumerate(chunks):
            if chunk.num_new_tokens != 1:
                raise DecodeBatchError(f"{chunk.seq.request_id}: {chunk.num_new_tokens} new tokens, not 1")
            pos = chunk.start
            table = chunk.seq.block_table
            needed = blocks_needed(chunk, pos + 1, bs, self.table_width)
            owner, written = self._rows[row]
            # Same list object and the last entry we wrote unchanged: only the appended entries are new.
            if owner is not table or (written and tables[row, written - 1] != table[written - 1]):
                written = 0
            if written < needed:
                tables[row, written:needed] = table[written:needed]
                self._rows[row] = (table, needed)
            ids.append(0 if ids_on_device else chunk.seq.token_ids[pos])
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            lens.append(pos + 1)
        self._np["input_ids"][:n] = ids
        self._np["positions"][:n] = positions
        self._np["slot_mapping"][:n] = slots
        self._np["seq_lens"][:n] = lens
        # Padding rows: token 0 at position 0, no KV slot, empty context (their outputs are ignored).
        self._np["input_ids"][n:] = 0
        self._np["positions"][n:] = 0
        self._np["slot_mapping"][n:] = -1
        self._np["seq_lens"][n:] = 0
        return n


class DecodeGraphRunner:
    """Replays a bucket's CUDA graphs: embed → layers (paged KV) → final norm → fp32 logits, all rows. A
    step is a few graphs over consecutive layer ranges (graph_pieces): the GPU starts before all is launched.

    Static inputs live in one device buffer per bucket, refreshed each step by a single non-blocking copy
    from pinned memory; the graph reads the KV cache and weights in place, so the runner must live exactly
    as long as both. Graph outputs are overwritten by the next replay of any bucket (they share one memory
    pool): callers copy what they keep.
    """

    def __init__(self, model: LlamaModel, kv_cache: KVCache, max_num_seqs: int, max_model_len: int,
                 device: torch.device | str) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = torch.device(device)
        self.buckets = decode_buckets(max_num_seqs)
        self.max_model_len = max_model_len
        # Widest block table a sequence can need (bounded by the whole cache too).
        self.table_width = min(-(-max_model_len // kv_cache.block_size), kv_cache.num_blocks)
        self._captured: dict[int, GraphedStep[DecodeStager]] = {}
        self._pool = None
        # Split-arrival counters for this engine's graphs (zero between launches): its own, so graphs of two
        # engines replayed on two streams never share them.
        self._arrivals = torch.zeros(max(self.buckets) * kv_cache.num_kv_heads, dtype=torch.int32,
                                     device=self.device)

    @property
    def captured_buckets(self) -> tuple[int, ...]:
        return tuple(sorted(self._captured))

    @property
    def pool(self) -> object | None:
        """The graphs' memory pool (None before the first capture): the verify graphs share it."""
        return self._pool

    def fits(self, chunks: Sequence[ScheduledChunk]) -> bool:
        """A decode-only step (one new token per sequence) small enough for a bucket."""
        return (pick_bucket(len(chunks), self.buckets) is not None
                and all(c.num_new_tokens == 1 for c in chunks))

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Capture every bucket now, largest first (smaller graphs then reuse its pool memory)."""
        for bucket in sorted(self.buckets, reverse=True):
            self._bucket(bucket)
        logger.info("captured decode CUDA graphs for batch sizes %s", self.captured_buckets)

    def run(self, chunks: Sequence[ScheduledChunk],
            token_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden [B, H], logits [B, V] fp32) for a decode step of B sequences, without a host sync.

        token_ids: the B input ids as a device tensor (the previous step's samples, not on the host yet);
        None reads them from the sequences. The returned tensors are views of the graph's outputs: valid
        until the next `run`.
        """
        if not torch.is_inference_mode_enabled():  # the buffers are inference tensors
            with torch.inference_mode():
                return self.run(chunks, token_ids)
        bucket = pick_bucket(len(chunks), self.buckets)
        if bucket is None:
            raise DecodeBatchError(f"a batch of {len(chunks)} fits no decode bucket {self.buckets}")
        entry = self._bucket(bucket)
        entry.wait_staging_free()
        n = entry.stager.fill(chunks, ids_on_device=token_ids is not None)
        hidden, logits, _ = entry.launch(n, token_ids)
        return hidden[:n], logits[:n]

    def _bucket(self, bucket: int) -> GraphedStep[DecodeStager]:
        entry = self._captured.get(bucket)
        if entry is None:
            entry = self._captured[bucket] = self._capture(bucket)
        return entry

    def _capture(self, bucket: int) -> GraphedStep[DecodeStager]:
        on_cuda = self.device.type == "cuda"
        stager = DecodeStager(bucket, self.table_width, self.kv_cache.block_size, pin_memory=on_cuda)
        # max_seq_len = the longest context: the split-K count frozen into the graph suits every length (split
        # bounds themselves come from the device-side seq_lens at replay).
        entry, self._pool = capture_step(self.model, self.kv_cache, stager, rows=bucket, max_query_len=1,
                                         max_seq_len=self.max_model_len, device=self.device, pool=self._pool,
                                         arrivals=self._arrivals)
        return entry
