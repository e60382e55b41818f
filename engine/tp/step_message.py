"""The step rank 0 broadcasts to its follower ranks: per chunk its tokens, start, sampled count and block
table, as one flat int64 tensor (its length, then the payload: two broadcasts a step)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from contracts.sampling import SamplingParams
from engine.scheduler import ScheduledChunk, SchedulerOutput
from engine.sequence import Sequence
from engine.tp.group import TPGroup

_STOP = -1  # a length that ends the followers' loop


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


def encode(chunks: tuple[ScheduledChunk, ...]) -> torch.Tensor:
    flat: list[int] = [len(chunks)]
    for chunk in map(ChunkMessage.of, chunks):
        flat += [chunk.start, chunk.num_sampled, len(chunk.token_ids), len(chunk.block_table)]
        flat += [*chunk.token_ids, *chunk.block_table]
    return torch.tensor(flat, dtype=torch.int64)


def decode(flat: torch.Tensor) -> SchedulerOutput:
    values = flat.tolist()
    chunks, at = [], 1
    for index in range(values[0]):
        start, num_sampled, num_tokens, num_blocks = values[at:at + 4]
        at += 4
        message = ChunkMessage(start, num_sampled, tuple(values[at:at + num_tokens]),
                               tuple(values[at + num_tokens:at + num_tokens + num_blocks]))
        at += num_tokens + num_blocks
        chunks.append(message.to_chunk(index))
    return SchedulerOutput(tuple(chunks), ())


def _broadcast(group: TPGroup, tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's `tensor` on every rank (NCCL broadcasts device tensors, gloo host ones)."""
    tensor = tensor.to(group.device)
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.pg.broadcast([tensor], opts).wait()
    return tensor.cpu()


def send_step(group: TPGroup, batch: SchedulerOutput | None) -> None:
    """Rank 0: tell the followers the step (None: stop following)."""
    flat = torch.tensor([_STOP], dtype=torch.int64) if batch is None else encode(batch.chunks)
    _broadcast(group, torch.tensor([flat.numel() if batch is not None else _STOP], dtype=torch.int64))
    if batch is not None:
        _broadcast(group, flat)


def receive_step(group: TPGroup) -> SchedulerOutput | None:
    """A follower: the next step rank 0 runs, or None when it stops."""
    length = int(_broadcast(group, torch.zeros(1, dtype=torch.int64)).item())
    if length == _STOP:
        return None
    return decode(_broadcast(group, torch.zeros(length, dtype=torch.int64)))
