"""Tensor-parallel modules that wrap the plain model's: row-parallel projections (all-reduce after, optionally
chunked along tokens to overlap), vocab-parallel embedding and LM head."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.tp.comm import TPComm


class RowParallel(nn.Module):
    """`inner` holds this rank's input columns; forward = all-reduce(inner(x)).

    With chunks > 1 and at least chunks · min_chunk_tokens rows, the rows go in `chunks` pieces: piece i's
    all-reduce is in flight (async) while piece i+1 multiplies, which hides communication behind compute.
    """

    def __init__(self, inner: nn.Module, comm: TPComm, chunks: int = 1, min_chunk_tokens: int = 1) -> None:
        super().__init__()
        self.inner = inner
        self.comm = comm
        self.chunks = chunks
        self.min_chunk_tokens = min_chunk_tokens

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if self.chunks <= 1 or rows < self.chunks * self.min_chunk_tokens:
            out = self.inner(x).contiguous()
            self.comm.all_reduce(out)
            return out
        pieces, works = [], []
        for part in x.tensor_split(self.chunks, dim=0):
            y = self.inner(part).contiguous()
            works.append(self.comm.all_reduce(y, async_op=True))
            pieces.append(y)
        for work in works:
            work.wait()
        return torch.cat(pieces, dim=0)


class VocabParallelEmbedding(nn.Module):
    """Rows vocab[start:start+len] of the embedding; tokens outside the range contribute zeros to the sum."""

    def __init__(self, weight: torch.Tensor, start: int, comm: TPComm) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.start = start
        self.comm = comm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside[:, None], 0.0).contiguous()
        # Exactly one rank contributes each row: the native sum is exact (never the lossy int8 path).
        self.comm.all_reduce_native(out)
        return out


class VocabParallelHead(nn.Module):
    """This rank's vocab rows of the LM head, zero-padded to the largest rank's share; forward → full logits.

    `head` is any module computing x @ rows.T (a Linear, or what a layout transform made of it)."""

    def __init__(self, head: nn.Module, shares: list[int], comm: TPComm) -> None:
        super().__init__()
        self.head = head
        self.shares = shares
        self.comm = comm

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gathered = self.comm.all_gather_last(self.head(x))
        if len(set(self.shares)) == 1:
            return gathered
        width = max(self.shares)
        return torch.cat([gathered[..., r * width:r * width + n] for r, n in enumerate(self.shares)], dim=-1)
