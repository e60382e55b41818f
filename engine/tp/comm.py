"""The collectives a sharded model calls, on its TP group: all-reduce (native dtype or int8, sync or async),
all-gather along the last dim; bytes on the wire counted for the worker's metrics."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist

from engine.config import TP_COMMS
from engine.tp.group import TPGroup
from engine.tp.int8_allreduce import int8_all_reduce

# Elements per int8 scale. 32 with one-byte scales: 0.516x of bf16's bytes (the issue allows 0.53x), and
# blocks that tile a hidden row (576 = 18·32, 4096 = 128·32), so an outlier channel coarsens only 31
# neighbours of its own token. Measured at TP=2 (docs/benchmarks.md): 256 with fp32 scales (0.508x, blocks
# straddling tokens) cost +0.78% perplexity, 64 with fp16 scales +0.26%, over the +0.2% allowed.
INT8_BLOCK = 32


class Waitable(Protocol):
    def wait(self) -> object: ...


@dataclass
class CommStats:
    """Per-rank counters: bytes this rank sent (ring-equivalent for native collectives) and calls made."""

    bytes_sent: int = 0
    all_reduces: int = 0


class _Done:
    def wait(self) -> bool:
        return True


def ring_all_reduce_bytes(numel: int, element_size: int, world: int) -> int:
    """Bytes one rank sends in a ring all-reduce: reduce-scatter plus all-gather, (world-1)/world each."""
    return 2 * (world - 1) * numel * element_size // world


class TPComm:
    """All-reduce in `mode` (TP_COMMS) over `group`; `stats` counts what went over the wire."""

    def __init__(self, group: TPGroup, mode: str = "bf16", int8_block: int = INT8_BLOCK) -> None:
        if mode not in TP_COMMS:
            raise ValueError(f"tp_comm must be one of {TP_COMMS}, got {mode!r}")
        self.group = group
        self.mode = mode
        self.int8_block = int8_block
        self.stats = CommStats()

    @property
    def world(self) -> int:
        return self.group.size

    def all_reduce_native(self, x: torch.Tensor, async_op: bool = False) -> Waitable:
        """Sum `x` (contiguous) in place in its own dtype; with async_op the caller waits on the result."""
        if self.world == 1:
            return _Done()
        self.stats.all_reduces += 1
        self.stats.bytes_sent += ring_all_reduce_bytes(x.numel(), x.element_size(), self.world)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.SUM
        work = self.group.pg.allreduce([x], opts)
        if not async_op:
            work.wait()
        return work

    def all_reduce(self, x: torch.Tensor, async_op: bool = False) -> Waitable:
        """Sum `x` in place in this comm's mode. int8 runs synchronously even with async_op (its two phases
        have a dequantize-sum-requantize step between them), so chunked overlap applies to the native mode."""
        if self.mode == "bf16" or self.world == 1:
            return self.all_reduce_native(x, async_op)
        self.stats.all_reduces += 1
        self.stats.bytes_sent += int8_all_reduce(x, self.group.pg, self.world, self.int8_block)
        return _Done()

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """[..., k] from every rank (same k) → [..., world·k] in rank order."""
        if self.world == 1:
            return x
        x = x.contiguous()
        outs = [torch.empty_like(x) for _ in range(self.world)]
        self.stats.bytes_sent += (self.world - 1) * x.numel() * x.element_size()
        self.group.pg.allgather([outs], [x]).wait()
        return torch.cat(outs, dim=-1)
