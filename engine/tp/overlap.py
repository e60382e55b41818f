"""How many token chunks a row-parallel GEMM is split into: a two-stage pipeline model fed by a measured
compute time, communication time and per-chunk overhead (measured the same on every rank)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from engine.tp.comm import TPComm
from engine.tp.layers import RowParallel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OverlapTiming:
    """Seconds for one row-parallel step at some token count, the slowest rank's: GEMM, all-reduce, and the
    fixed cost one extra chunk adds (a second GEMM call plus a second collective call on a tiny input)."""

    compute_s: float
    comm_s: float
    per_chunk_s: float

    @property
    def ratio(self) -> float:
        """communication / compute: near 0 leaves nothing to hide; near 1 hides the most."""
        return self.comm_s / max(self.compute_s, 1e-12)

    def pipelined_s(self, chunks: int) -> float:
        """Chunk i's all-reduce runs under chunk i+1's GEMM: (a + b) / c + (c - 1) / c · max(a, b)."""
        a, b, c = self.compute_s, self.comm_s, chunks
        return (a + b) / c + (c - 1) / c * max(a, b) + (c - 1) * self.per_chunk_s

    def best_chunks(self, max_chunks: int = 8) -> int:
        return min(range(1, max_chunks + 1), key=self.pipelined_s)


def best_time_s(fn, reps: int) -> float:
    """Best wall seconds of `reps` calls of fn after one warm-up call."""
    fn()  # warm
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@torch.no_grad()
def measure(layer: RowParallel, comm: TPComm, tokens: int, reps: int = 5) -> OverlapTiming:
    """Times `layer`'s GEMM (a plain projection: input width = its weight's) and all-reduce on `tokens` rows.
    Every rank must call it (collectives inside) and gets the same numbers (the max over ranks), so all pick
    the same chunk count: unequal counts would pair mismatched collectives."""
    inner: nn.Module = layer.inner
    weight = layer.weight
    x = torch.randn(tokens, weight.shape[1], dtype=weight.dtype, device=weight.device)
    tiny = torch.randn(1, weight.shape[1], dtype=weight.dtype, device=weight.device)
    y = inner(x).contiguous()
    y_tiny = inner(tiny).contiguous()
    sync = torch.cuda.synchronize if weight.device.type == "cuda" else (lambda: None)

    def gemm() -> None:
        inner(x)
        sync()

    def reduce() -> None:
        comm.all_reduce(y)
        sync()

    def overhead() -> None:
        inner(tiny)
        comm.all_reduce(y_tiny)
        sync()

    counted = (comm.stats.bytes_sent, comm.stats.all_reduces)  # measuring is not serving traffic
    times = [best_time_s(gemm, reps), best_time_s(reduce, reps), best_time_s(overhead, reps)]
    comm.stats.bytes_sent, comm.stats.all_reduces = counted
    slowest = torch.tensor(times, dtype=torch.float64, device=weight.device)
    opts = dist.AllreduceOptions()
    opts.reduceOp = dist.ReduceOp.MAX
    comm.group.pg.allreduce([slowest], opts).wait()
    return OverlapTiming(*slowest.tolist())


def set_chunks(model: nn.Module, chunks: int) -> int:
    """Sets every RowParallel module's chunk count; returns how many there are."""
    layers = [m for m in model.modules() if isinstance(m, RowParallel)]
    for layer in layers:
        layer.chunks = chunks
    return len(layers)


def tune_chunks(model: nn.Module, comm: TPComm, tokens: int) -> int:
    """Measures the first layer's o_proj (its input is plain activations) at `tokens` rows and sets every
    row-parallel module's chunk count to the pipeline model's best; every rank must call it."""
    timing = measure(model.layers[0].self_attn.o_proj, comm, tokens)
    chunks = timing.best_chunks()
    set_chunks(model, chunks)
    logger.info("TP overlap: comm/compute %.2f at %d tokens → %d chunks", timing.ratio, tokens, chunks)
    return chunks
