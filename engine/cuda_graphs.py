"""CUDA graphs for decode steps: static inputs per bucketed batch size, padded rows that write nothing."""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine.kv_cache import KVCache
from engine.model import LlamaModel
from engine.scheduler import ScheduledChunk
from kernels.attention.metadata import AttentionMetadata, BlockTableError

logger = logging.getLogger(__name__)

# Every input of a padded decode batch, in the order they sit in one flat int32 buffer (one H2D copy a step).
INPUT_FIELDS = ("input_ids", "positions", "slot_mapping", "seq_lens", "query_start_loc", "block_tables")
_ALIGN = 4  # int32 elements = 16 bytes: Triton specializes kernels on 16-byte pointer alignment


class DecodeBatchError(ValueError):
    """A batch the decode graphs cannot serve (multi-token chunk, too many rows, context past the table)."""


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


def input_layout(bucket: int, table_width: int,
                 rows: int | None = None) -> tuple[dict[str, tuple[int, int]], int]:
    """(field → (offset, length)) in int32 elements, each offset 16-byte aligned; and the buffer length.
    `rows`: query rows (token ids, positions, slots) of the batch; None = one per sequence (decode)."""
    rows = bucket if rows is None else rows
    lengths = {"input_ids": rows, "positions": rows, "slot_mapping": rows, "seq_lens": bucket,
               "query_start_loc": bucket + 1, "block_tables": bucket * table_width}
    layout: dict[str, tuple[int, int]] = {}
    offset = 0
    for name in INPUT_FIELDS:
        layout[name] = (offset, lengths[name])
        offset += -(-lengths[name] // _ALIGN) * _ALIGN
    return layout, offset


@dataclass(frozen=True)
class DecodeInputs:
    """Views of one flat int32 buffer (host staging or device): what a captured decode step reads."""

    input_ids: torch.Tensor  # [rows] (decode: rows = bucket)
    positions: torch.Tensor  # [rows]
    slot_mapping: torch.Tensor  # [rows]; -1 on padded rows: store_kv writes nothing there
    seq_lens: torch.Tensor  # [bucket]; 0 on padded rows: attention reads no KV and writes zeros
    query_start_loc: torch.Tensor  # [bucket + 1]; decode: arange, one query row per sequence
    block_tables: torch.Tensor  # [bucket, table_width]

    @classmethod
    def views(cls, buffer: torch.Tensor, bucket: int, table_width: int,
              rows: int | None = None) -> DecodeInputs:
        layout, size = input_layout(bucket, table_width, rows)
        if buffer.dtype != torch.int32 or buffer.numel() != size:
            raise ValueError(f"decode inputs need int32 [{size}], got {buffer.dtype} [{buffer.numel()}]")
        parts = {name: buffer[off:off + n] for name, (off, n) in layout.items()}
        parts["block_tables"] = parts["block_tables"].view(bucket, table_width)
        return cls(**parts)


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
            needed = pos // bs + 1
            if len(table) < needed:
                raise BlockTableError(f"{chunk.seq.request_id}: {len(table)} blocks cannot hold {pos + 1} "
                                      f"tokens (block_size {bs})")
            if needed > self.table_width:
                raise DecodeBatchError(f"{chunk.seq.request_id}: {needed} blocks exceed the captured table "
                                       f"width {self.table_width}")
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


def graph_pieces(num_layers: int) -> tuple[range, ...]:
    """Layer ranges of a decode step's graphs, in order: 1, 2, 4, 8, … layers, the last piece what is left.

    Launching a graph costs host time per kernel in it (~0.37 ms for a whole Llama-3-8B step on an H100
    host), and until the launch is through the GPU has nothing to run. In pieces, the GPU waits only for the
    first (one layer's) launch; each later piece is launched while the GPU runs the ones before, which takes
    far longer than the launch (a piece's GPU time and its launch cost both grow with its layer count).
    """
    pieces, start, size = [], 0, 1
    while start < num_layers:
        end = min(num_layers, start + size)
        pieces.append(range(start, end))
        start, size = end, 2 * size
    return tuple(pieces) or (range(0),)


@dataclass
class _CapturedBucket:
    stager: DecodeStager
    device_buffer: torch.Tensor
    inputs: DecodeInputs  # views of device_buffer
    graphs: tuple[torch.cuda.CUDAGraph, ...]  # one per graph_pieces range; () runs `forward` eagerly
    forward: Callable[[], tuple[torch.Tensor, torch.Tensor]]  # → (hidden [bucket, H], logits [bucket, V])
    hidden: torch.Tensor
    logits: torch.Tensor
    copied: torch.cuda.Event | None = None  # the H2D copy out of `stager.buffer` that may still be in flight


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
        self._captured: dict[int, _CapturedBucket] = {}
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
        if entry.copied is not None and not entry.copied.query():
            # Only if a caller never waited for the last step's results: the pinned buffer is still read.
            entry.copied.synchronize()
        n = entry.stager.fill(chunks, ids_on_device=token_ids is not None)
        entry.device_buffer.copy_(entry.stager.buffer, non_blocking=True)
        if token_ids is not None:
            entry.inputs.input_ids[:n].copy_(token_ids)  # stream-ordered after the staging copy
        if self.device.type == "cuda":
            if entry.copied is None:
                entry.copied = torch.cuda.Event()
            entry.copied.record()
        if entry.graphs:
            for graph in entry.graphs:
                graph.replay()
            return entry.hidden[:n], entry.logits[:n]
        hidden, logits = entry.forward()
        return hidden[:n], logits[:n]

    def _bucket(self, bucket: int) -> _CapturedBucket:
        entry = self._captured.get(bucket)
        if entry is None:
            entry = self._captured[bucket] = self._capture(bucket)
        return entry

    def _capture(self, bucket: int) -> _CapturedBucket:
        on_cuda = self.device.type == "cuda"
        stager = DecodeStager(bucket, self.table_width, self.kv_cache.block_size, pin_memory=on_cuda)
        # All rows padding, so warm-up and capture store no KV. (clone: on CPU `.to` would alias the staging.)
        device_buffer = stager.buffer.to(self.device) if on_cuda else stager.buffer.clone()
        inputs = DecodeInputs.views(device_buffer, bucket, self.table_width)
        # max_seq_len = the longest context: the split-K count frozen into the graph suits every length (split
        # bounds themselves come from the device-side seq_lens at replay).
        meta = AttentionMetadata(
            slot_mapping=inputs.slot_mapping, query_start_loc=inputs.query_start_loc,
            seq_lens=inputs.seq_lens, block_tables=inputs.block_tables, max_query_len=1,
            max_seq_len=self.max_model_len, block_size=self.kv_cache.block_size, spans=(),
            arrivals=self._arrivals)
        model, kv = self.model, self.kv_cache
        pieces = graph_pieces(len(model.layers))
        state: dict[str, torch.Tensor | None] = {}  # what a piece hands the next (graph memory once captured)

        def run_piece(i: int) -> None:
            if i == 0:
                h, state["cos"], state["sin"] = model.embed(inputs.input_ids, inputs.positions)
                residual = None
            else:
                h, residual = state["h"], state["residual"]
            state["h"], state["residual"] = model.forward_layers(
                h, residual, state["cos"], state["sin"], meta, kv, pieces[i])
            if i == len(pieces) - 1:
                state["hidden"] = model.final_norm(state["h"], state["residual"])
                state["logits"] = model.compute_logits(state["hidden"])

        def forward() -> tuple[torch.Tensor, torch.Tensor]:
            for i in range(len(pieces)):
                run_piece(i)
            return state["hidden"], state["logits"]

        if not on_cuda:  # nothing to capture: the same static buffers, the forward run eagerly
            hidden, logits = forward()
            return _CapturedBucket(stager, device_buffer, inputs, (), forward, hidden, logits)
        graphs, self._pool = capture_pieces(run_piece, len(pieces), forward, self.device, self._pool)
        hidden, logits = state["hidden"], state["logits"]
        return _CapturedBucket(stager, device_buffer, inputs, graphs, forward, hidden, logits)


def capture_pieces(
    run_piece: Callable[[int], None], num_pieces: int, forward: Callable[[], object], device: torch.device,
    pool: object | None,
) -> tuple[tuple[torch.cuda.CUDAGraph, ...], object]:
    """One CUDA graph per piece (`run_piece(i)`), in order, all in memory pool `pool` (None: a new one);
    returns the graphs and the pool. `forward` (every piece) runs twice first, outside the capture: it
    compiles the Triton kernels and lets cuBLAS pick its kernels. Each piece reads the tensors the piece
    before it wrote inside its own capture, so the caller keeps them (graph memory once captured)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            forward()
    torch.cuda.current_stream(device).wait_stream(side)
    graphs = []
    for i in range(num_pieces):
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (KV receivers, servers) may use CUDA while this thread captures.
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            run_piece(i)
        if pool is None:
            pool = graph.pool()
        graphs.append(graph)
    return tuple(graphs), pool
