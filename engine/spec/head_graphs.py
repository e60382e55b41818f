"""Greedy head drafting for a batch of sequences: the k sequential head steps captured as one CUDA graph."""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from engine.cuda_graphs import decode_buckets, pick_bucket
from engine.spec.draft_head import DraftHead, rotate
from engine.spec.head_drafter import HeadDrafter

logger = logging.getLogger(__name__)


@dataclass
class _Bucket:
    graph: torch.cuda.CUDAGraph | None  # None on CPU: `draft` runs eagerly over the same buffers
    draft: Callable[[], torch.Tensor]
    drafts: torch.Tensor  # [bucket, k] int64: the graph's output


class HeadDraftGraphs:
    """Drafts k tokens for each of up to `max_num_seqs` greedy `HeadDrafter`s at once, one graph replay per
    batch bucket instead of k eager head steps per sequence (each ~20 kernel launches and a host sync).

    Static inputs, shared by every bucket (a bucket's graph reads the first `bucket` rows): each drafter's
    head KV of its accepted positions copied into `ctx_k`/`ctx_v` [max_num_seqs, Hk, max_len, D] (its
    length in `ctx_len`), its last block output in `last`, its committed count in `committed`. Step j
    (0-based) drafts from the head's argmax over its (limited) subset, then runs the head block once
    for that draft at position committed + j, attending to the sequence's context and its drafts so far
    (a mask over the padded context), exactly `HeadDrafter.propose`'s math batched. Sampled drafts (T > 0)
    stay with `HeadDrafter.propose`: they need their distributions and seeded draws per sequence.

    Memory: 2 · max_num_seqs · Hk · max_len · D elements of the head's dtype for the context (the embedded
    model at max_num_seqs 32, max_len 8192, bf16: 192 MiB), plus the graphs' activations.
    """

    def __init__(self, head: DraftHead, embed: nn.Embedding, max_num_seqs: int, max_len: int, k: int,
                 draft_vocab_limit: int | None = None) -> None:
        c = head.config
        weight = head.fc.weight
        self.head, self.embed, self.k = head, embed, k
        self.device, self.max_len = weight.device, max_len
        self.limit = draft_vocab_limit
        self.buckets = decode_buckets(max_num_seqs)
        shape = (max_num_seqs, c.num_kv_heads, max_len, c.head_dim)
        self.ctx_k = torch.zeros(shape, dtype=weight.dtype, device=self.device)
        self.ctx_v = torch.zeros_like(self.ctx_k)
        self.ctx_len = torch.zeros(max_num_seqs, dtype=torch.int64, device=self.device)
        self.committed = torch.zeros(max_num_seqs, dtype=torch.int64, device=self.device)
        self.last = torch.zeros(max_num_seqs, c.hidden_size, dtype=weight.dtype, device=self.device)
        self._captured: dict[int, _Bucket] = {}
        self._pool = None

    def serves(self, drafter: HeadDrafter) -> bool:
        """A greedy drafter of this head with a last block output and a context that fits `max_len`."""
        return (drafter.head is self.head and drafter.sampling is None and drafter.last is not None
                and drafter.limit == self.limit and (drafter.k is None or drafter.k.shape[2] <= self.max_len))

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Capture every bucket now, largest first (smaller graphs then reuse the pool's memory)."""
        for bucket in sorted(self.buckets, reverse=True):
            self._bucket(bucket)
        logger.info("captured head drafting CUDA graphs (k=%d) for batch sizes %s", self.k, self.buckets)

    @torch.inference_mode()
    def propose(self, drafters: Sequence[HeadDrafter]) -> list[list[int]]:
        """k greedy drafts per drafter (each `serves`), in order; one host sync for all of them."""
        bucket = pick_bucket(len(drafters), self.buckets)
        if bucket is None:
            raise ValueError(f"{len(drafters)} drafters fit no head drafting bucket {self.buckets}")
        entry = self._bucket(bucket)
        lengths, committed = [], []
        for row, drafter in enumerate(drafters):
            n = 0 if drafter.k is None else drafter.k.shape[2]
            if n:
                self.ctx_k[row, :, :n].copy_(drafter.k[0], non_blocking=True)
                self.ctx_v[row, :, :n].copy_(drafter.v[0], non_blocking=True)
            self.last[row].copy_(drafter.last[0, -1], non_blocking=True)
            lengths.append(n)
            committed.append(drafter.num_committed)
        # Rows past the batch keep stale inputs: their drafts are computed and never read.
        host = torch.tensor([lengths, committed], dtype=torch.int64)
        if self.device.type == "cuda":
            host = host.pin_memory()
        both = host.to(self.device, non_blocking=True)
        self.ctx_len[:len(drafters)].copy_(both[0])
        self.committed[:len(drafters)].copy_(both[1])
        if entry.graph is not None:
            entry.graph.replay()
            drafts = entry.drafts
        else:
            drafts = entry.draft()
        return drafts[:len(drafters)].tolist()

    def _bucket(self, bucket: int) -> _Bucket:
        entry = self._captured.get(bucket)
        if entry is None:
            entry = self._captured[bucket] = self._capture(bucket)
        return entry

    def _capture(self, bucket: int) -> _Bucket:
        head, embed, k, limit = self.head, self.embed, self.k, self.limit
        c = head.config
        ctx_k, ctx_v = self.ctx_k[:bucket], self.ctx_v[:bucket]
        ctx_len, committed, last = self.ctx_len[:bucket], self.committed[:bucket], self.last[:bucket]
        d2t = head.d2t if limit is None else head.d2t[:limit]
        context = torch.arange(self.max_len, device=self.device)
        steps = torch.arange(k, device=self.device)

        def next_draft(a: torch.Tensor) -> torch.Tensor:
            logits = head.logits(a)  # [bucket, S]
            if limit is not None:
                logits = logits[:, :limit]
            return d2t[logits.argmax(dim=-1)]

        def draft() -> torch.Tensor:
            drafts = [next_draft(last)]
            a = last.unsqueeze(1)  # [bucket, 1, H]
            draft_k = ctx_k.new_zeros(bucket, c.num_kv_heads, k, c.head_dim)
            draft_v = torch.zeros_like(draft_k)
            seen_context = context[None, :] < ctx_len[:, None]  # [bucket, max_len]
            for j in range(1, k):
                emb = embed(drafts[-1][:, None]).to(a.dtype)  # [bucket, 1, H]
                x = torch.cat([head.embed_norm(emb), head.feature_norm(a)], dim=-1)
                heads = head.qkv_proj(x).view(bucket, 1, c.num_heads + 2 * c.num_kv_heads, c.head_dim)
                split = [c.num_heads, c.num_kv_heads, c.num_kv_heads]
                q, new_k, new_v = heads.transpose(1, 2).split(split, dim=1)
                cos, sin = head.rope(committed + (j - 1))  # [bucket, D/2]: each row at its own position
                cos, sin = cos[:, None, None, :], sin[:, None, None, :]
                q, new_k = rotate(q, cos, sin), rotate(new_k, cos, sin)
                draft_k[:, :, j - 1] = new_k[:, :, 0]
                draft_v[:, :, j - 1] = new_v[:, :, 0]
                seen = torch.cat([seen_context, (steps < j)[None, :].expand(bucket, k)], dim=1)
                a = head.finish(a, q, torch.cat([ctx_k, draft_k], dim=2), torch.cat([ctx_v, draft_v], dim=2),
                                seen[:, None, None, :])
                drafts.append(next_draft(a[:, -1]))
            return torch.stack(drafts, dim=1)

        if self.device.type != "cuda":
            return _Bucket(None, draft, draft())
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up: lets cuBLAS and SDPA pick their kernels
            for _ in range(2):
                draft()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            drafts = draft()
        self._pool = self._pool or graph.pool()
        return _Bucket(graph, draft, drafts)
