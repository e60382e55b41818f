"""What decode and verify CUDA graphs share: static inputs, the forward in layer pieces, capture, replay."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

import torch

from engine.kv_cache import KVCache
from engine.model import LlamaModel
from kernels.attention.metadata import AttentionMetadata, BlockTableError

if TYPE_CHECKING:
    from engine.scheduler_types import ScheduledChunk

# Every input of a padded step, in the order they sit in one flat int32 buffer (one H2D copy a step).
INPUT_FIELDS = ("input_ids", "positions", "slot_mapping", "seq_lens", "query_start_loc", "block_tables")
_ALIGN = 4  # int32 elements = 16 bytes: Triton specializes kernels on 16-byte pointer alignment

# (hidden [rows, H], logits [rows, V] fp32, the feature layers' outputs [rows, F·H] or None)
StepOutputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


class DecodeBatchError(ValueError):
    """A batch the decode graphs cannot serve (multi-token chunk, too many rows, context past the table)."""


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


class Stager(Protocol):
    """The host side of one captured shape (DecodeStager, VerifyStager): the int32 buffer it fills."""

    buffer: torch.Tensor
    bucket: int
    table_width: int


S = TypeVar("S", bound=Stager)


def blocks_needed(chunk: ScheduledChunk, end: int, block_size: int, table_width: int) -> int:
    """Block-table entries the chunk's sequence uses for its first `end` tokens. Raises BlockTableError
    when its table is shorter, DecodeBatchError when they pass the captured table width (run it eagerly)."""
    needed = -(-end // block_size)
    table = chunk.seq.block_table
    if len(table) < needed:
        raise BlockTableError(f"{chunk.seq.request_id}: {len(table)} blocks cannot hold {end} tokens "
                              f"(block_size {block_size})")
    if needed > table_width:
        raise DecodeBatchError(f"{chunk.seq.request_id}: {needed} blocks exceed the captured table width "
                               f"{table_width}")
    return needed


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
class GraphedStep(Generic[S]):
    """One captured shape: its stager's buffer is copied into `device_buffer` (which `inputs` views), then
    the graphs replay (on CPU `forward` runs eagerly over the same static buffers)."""

    stager: S
    device_buffer: torch.Tensor
    inputs: DecodeInputs  # views of device_buffer
    graphs: tuple[torch.cuda.CUDAGraph, ...]  # one per graph_pieces range; () runs `forward` eagerly
    forward: Callable[[], StepOutputs]
    outputs: StepOutputs  # the graphs' output tensors (graph memory: overwritten by the next replay)
    copied: torch.cuda.Event | None = None  # the H2D copy out of `stager.buffer` that may still be in flight

    def wait_staging_free(self) -> None:
        """Wait for the last step's copy out of the pinned staging buffer before refilling it: it blocks only
        when a caller never waited for that step's results."""
        if self.copied is not None and not self.copied.query():
            self.copied.synchronize()

    def launch(self, rows: int, token_ids: torch.Tensor | None = None) -> StepOutputs:
        """Copy the filled staging buffer up, then run the step; the outputs' first `rows` rows are real.
        token_ids: the first rows' input ids as a device tensor, copied in stream order after the staging."""
        self.device_buffer.copy_(self.stager.buffer, non_blocking=True)
        if token_ids is not None:
            self.inputs.input_ids[:rows].copy_(token_ids)
        if self.device_buffer.is_cuda:
            if self.copied is None:
                self.copied = torch.cuda.Event()
            self.copied.record()
        if not self.graphs:
            return self.forward()
        for graph in self.graphs:
            graph.replay()
        return self.outputs


def capture_step(model: LlamaModel, kv: KVCache, stager: S, rows: int, max_query_len: int,
                 max_seq_len: int, device: torch.device, pool: object | None,
                 feature_layers: Sequence[int] = (), arrivals: torch.Tensor | None = None,
                 ) -> tuple[GraphedStep[S], object | None]:
    """Static device inputs for `stager`'s shape, the forward over them in graph_pieces, captured on CUDA
    into `pool` (None: a new one); returns the step and the pool. With `feature_layers`, those layers'
    outputs (the residual stream h + residual) are concatenated in that order as the third output."""
    on_cuda = device.type == "cuda"
    # All rows padding, so warm-up and capture store no KV. (clone: on CPU `.to` would alias the staging.)
    device_buffer = stager.buffer.to(device) if on_cuda else stager.buffer.clone()
    inputs = DecodeInputs.views(device_buffer, stager.bucket, stager.table_width, rows)
    meta = AttentionMetadata(
        slot_mapping=inputs.slot_mapping, query_start_loc=inputs.query_start_loc,
        seq_lens=inputs.seq_lens, block_tables=inputs.block_tables, max_query_len=max_query_len,
        max_seq_len=max_seq_len, block_size=kv.block_size, spans=(), arrivals=arrivals)
    # Locals only in the closures: a closure holding a runner would make runner → graph → runner a cycle
    # that keeps the graphs' memory until the garbage collector runs (benchmarks build many engines).
    feature_layers = tuple(feature_layers)
    wanted = set(feature_layers)
    pieces = graph_pieces(len(model.layers))
    state: dict[str, torch.Tensor | None] = {}  # what a piece hands the next (graph memory once captured)

    def run_piece(i: int) -> None:
        if i == 0:
            h, state["cos"], state["sin"] = model.embed(inputs.input_ids, inputs.positions)
            residual = None
        else:
            h, residual = state["h"], state["residual"]
        for layer in pieces[i]:  # one layer at a time: a feature layer's output is read right after it
            h, residual = model.forward_layers(h, residual, state["cos"], state["sin"], meta, kv,
                                               range(layer, layer + 1))
            if layer in wanted:
                state[f"feature{layer}"] = h + residual
        state["h"], state["residual"] = h, residual
        if i == len(pieces) - 1:
            state["hidden"] = model.final_norm(h, residual)
            state["logits"] = model.compute_logits(state["hidden"])
            if feature_layers:
                state["features"] = torch.cat([state[f"feature{j}"] for j in feature_layers], dim=-1)

    def forward() -> StepOutputs:
        for i in range(len(pieces)):
            run_piece(i)
        return state["hidden"], state["logits"], state.get("features")

    if on_cuda:
        graphs, pool = capture_pieces(run_piece, len(pieces), forward, device, pool)
        outputs = state["hidden"], state["logits"], state.get("features")
    else:  # nothing to capture: the same static buffers, the forward run eagerly at each step
        graphs, outputs = (), forward()
    return GraphedStep(stager, device_buffer, inputs, graphs, forward, outputs), pool


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
