"""What rank 0 broadcasts to its follower ranks, as one flat int64 tensor (its length, then the payload:
two broadcasts a message): a step (per chunk its tokens, start, sampled count and block table, plus the
blocks whose KV shards the followers send rank 0 at every layer), or a load (blocks rank 0 scatters next)."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from contracts.sampling import SamplingParams
from engine.scheduler import ScheduledChunk, SchedulerOutput
from engine.sequence import Sequence
from engine.tp.group import TPGroup

_STOP = -1  # a length that ends the followers' loop
_STEP, _LOAD = 0, 1  # the payload's first word: which message
# How long an idle follower waits for rank 0's next message: as long as the worker lives (an idle worker may
# see no request for hours; a follower exits with its parent instead: engine/tp/worker_ranks.py). The group's
# own timeout (engine/tp/group.py) still bounds every collective inside a step.
_IDLE_WAIT = timedelta(days=365)


@dataclass(frozen=True)
class StepMessage:
    """Run `batch`; at every layer hook send rank 0 the rank's KV shard of `export_blocks` (a prefill worker
    shipping finished prompts' KV: engine/tp/kv_shards.py)."""

    batch: SchedulerOutput
    export_blocks: tuple[int, ...] = ()


@dataclass(frozen=True)
class LoadMessage:
    """Receive the rank's kv heads of these blocks from rank 0 (KV that arrived from another worker)."""

    block_ids: tuple[int, ...]


Message = StepMessage | LoadMessage


@dataclass(frozen=True)
class ChunkMessage:
    """What a follower needs to compute one chunk exactly as rank 0 does (tokens include verify drafts)."""

    start: int
    num_sampled: int
    token_ids: tuple[int, ...]
    block_table: tuple[int, ...]

    @classmethod
    def of(cls, chunk: ScheduledChunk) -> ChunkMessage:
        return cls(chunk.start, chunk.num_sampled, tuple(chunk.token_ids), tuple(chunk.seq.block_table))

    def to_chunk(self, index: int) -> ScheduledChunk:
        """A stand-in chunk: its sequence holds these tokens at their positions; sampling params are default
        (the follower's samples are discarded; only rank 0's count)."""
        seq = Sequence(f"follower-{index}", [0] * self.start + list(self.token_ids), SamplingParams(),
                       block_table=list(self.block_table))
        return ScheduledChunk(seq, self.start, len(self.token_ids), self.num_sampled)


def encode(chunks: tuple[ScheduledChunk, ...], export_blocks: tuple[int, ...] = ()) -> torch.Tensor:
    flat: list[int] = [_STEP, len(chunks)]
    for chunk in map(ChunkMessage.of, chunks):
        flat += [chunk.start, chunk.num_sampled, len(chunk.token_ids), len(chunk.block_table)]
        flat += [*chunk.token_ids, *chunk.block_table]
    flat += [len(export_blocks), *export_blocks]
    return torch.tensor(flat, dtype=torch.int64)


def encode_load(block_ids: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor([_LOAD, len(block_ids), *block_ids], dtype=torch.int64)


def decode(flat: torch.Tensor) -> Message:
    values = flat.tolist()
    if values[0] == _LOAD:
        return LoadMessage(tuple(values[2:2 + values[1]]))
    chunks, at = [], 2
    for index in range(values[1]):
        start, num_sampled, num_tokens, num_blocks = values[at:at + 4]
        at += 4
        message = ChunkMessage(start, num_sampled, tuple(values[at:at + num_tokens]),
                               tuple(values[at + num_tokens:at + num_tokens + num_blocks]))
        at += num_tokens + num_blocks
        chunks.append(message.to_chunk(index))
    export = tuple(values[at + 1:at + 1 + values[at]])
    return StepMessage(SchedulerOutput(tuple(chunks), ()), export)


def _broadcast(group: TPGroup, tensor: torch.Tensor, timeout: timedelta | None = None) -> torch.Tensor:
    """Rank 0's `tensor` on every rank (NCCL broadcasts device tensors, gloo host ones)."""
    tensor = tensor.to(group.device)
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    if timeout is not None:
        opts.timeout = timeout
    group.pg.broadcast([tensor], opts).wait()
    return tensor.cpu()


def send_message(group: TPGroup, flat: torch.Tensor | None) -> None:
    """Rank 0: tell the followers an encoded message (None: stop following)."""
    _broadcast(group, torch.tensor([flat.numel() if flat is not None else _STOP], dtype=torch.int64))
    if flat is not None:
        _broadcast(group, flat)


def send_step(group: TPGroup, batch: SchedulerOutput | None, export_blocks: tuple[int, ...] = ()) -> None:
    """Rank 0: tell the followers the step (None: stop following)."""
    send_message(group, None if batch is None else encode(batch.chunks, export_blocks))


def receive_message(group: TPGroup) -> Message | None:
    """A follower: what rank 0 does next, or None when it stops."""
    length = int(_broadcast(group, torch.zeros(1, dtype=torch.int64), _IDLE_WAIT).item())
    if length == _STOP:
        return None
    return decode(_broadcast(group, torch.zeros(length, dtype=torch.int64)))
