"""Torch reference of paged attention over the block KV cache: `paged_attention_ref` (any device)."""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from kernels.store_kv.quant import QuantizedKV, dequantize_blocks

if TYPE_CHECKING:
    from kernels.attention.metadata import AttentionMetadata, SeqSpan
    from kernels.store_kv.reference import KVOperand


@functools.lru_cache(maxsize=16)
def _zero(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 0-dim zero: the (ignored, beta=0) addend that lets baddbmm apply the softmax scale in the GEMM."""
    return torch.zeros((), dtype=dtype, device=device)


def _context(
    cache: torch.Tensor, block_ids: tuple[int, ...], first_slot: int | None, seq_len: int
) -> torch.Tensor:
    """A sequence's seq_len cached rows, heads first [Hk, S, D]: a view if its blocks are consecutive, else a
    gather."""
    num_kv_heads, head_dim = cache.shape[2], cache.shape[3]
    if first_slot is not None and cache.is_contiguous():
        row = num_kv_heads * head_dim
        # One as_strided instead of view + slice + transpose (decode on CPU pays per op).
        return cache.as_strided((num_kv_heads, seq_len, head_dim), (head_dim, row, 1),
                                cache.storage_offset() + first_slot * row)
    index = torch.tensor(block_ids, dtype=torch.long, device=cache.device)
    return cache.index_select(0, index).flatten(0, 1)[:seq_len].transpose(0, 1)


def _attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Decode: q [1, Hq, D] sees all S keys of k, v [Hk, S, D]. Two small matmuls beat SDPA's setup cost."""
    num_kv_heads, head_dim = k.shape[0], k.shape[2]
    qg = q.reshape(num_kv_heads, -1, head_dim)  # query heads grouped by the KV head they share (GQA)
    # [Hk, G, S] = scale · q kᵀ, the scale applied by the GEMM (beta=0: the zero addend is never read).
    scores = torch.baddbmm(_zero(q.dtype, q.device), qg, k.transpose(1, 2), beta=0, alpha=scale)
    if scores.dtype == torch.float32:
        probs = scores.softmax(dim=-1)
    else:  # softmax in float32 for half-precision caches too
        probs = scores.float().softmax(dim=-1).to(v.dtype)
    return torch.bmm(probs, v).view(1, -1, head_dim)  # [Hk, G, D] → [1, Hq, D]


def _tree_mask(tree: tuple[int, ...], seq_len: int, device: torch.device) -> torch.Tensor:
    """[L, S] bool: the whole context before the chunk, then the chunk rows set in each query row's bits."""
    query_len = len(tree)
    bits = torch.tensor([[(b >> j) & 1 for j in range(query_len)] for b in tree], dtype=torch.bool)
    context = torch.ones(query_len, seq_len - query_len, dtype=torch.bool)
    return torch.cat([context, bits], dim=1).to(device)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
            tree: tuple[int, ...] | None = None) -> torch.Tensor:
    """q [L, Hq, D] are the last L positions of the S keys/values [Hk, S, D]; causal (or, for a tree chunk,
    each row sees the context and its `tree` bits of the chunk); GQA by head groups."""
    query_len, seq_len = q.shape[0], k.shape[1]
    if query_len == 1:
        return _attend_one(q, k, v, scale)  # the newest token sees every cached position
    qh = q.transpose(0, 1)  # heads first, like k and v
    if tree is not None:
        mask, causal = _tree_mask(tree, seq_len, q.device), False
    elif query_len == seq_len:
        mask, causal = None, True
    else:
        # Query i sits at position seq_len - query_len + i and sees keys up to and including itself.
        mask = torch.ones(query_len, seq_len, dtype=torch.bool, device=q.device).tril(seq_len - query_len)
        causal = False
    out = F.scaled_dot_product_attention(
        qh, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=qh.shape[0] != k.shape[0]
    )
    return out.transpose(0, 1)


def paged_attention_ref(
    q: torch.Tensor, k_cache: KVOperand, v_cache: KVOperand, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """q [T, Hq, D] (this step's queries, rows laid out by meta.spans) → attention output [T, Hq, D].

    Each sequence's queries attend to all its cached tokens before them plus causally within the chunk (a
    tree span: to its rows' ancestors in the chunk), so one call serves chunked prefill, decode, mixed
    batches and tree verification. The cache must already hold this step's KV.
    Quantized caches (QuantizedKV) are dequantized one sequence's blocks at a time, never as a whole.
    """
    if len(meta.spans) == 1:  # one sequence (e.g. bs1 decode): no output buffer to scatter into
        return _attend_span(q, k_cache, v_cache, meta.spans[0], scale)
    out = torch.empty_like(q)
    for span in meta.spans:
        rows = slice(span.query_start, span.query_start + span.query_len)
        out[rows] = _attend_span(q[rows], k_cache, v_cache, span, scale)
    return out


def _quantized_context(cache: QuantizedKV, block_ids: tuple[int, ...], seq_len: int,
                       dtype: torch.dtype) -> torch.Tensor:
    """A sequence's seq_len rows of a quantized cache, dequantized to `dtype`, heads first [Hk, S, D]."""
    index = torch.tensor(block_ids, dtype=torch.long, device=cache.device)
    return dequantize_blocks(cache, index, dtype).flatten(0, 1)[:seq_len].transpose(0, 1)


def _attend_span(q: torch.Tensor, k_cache: KVOperand, v_cache: KVOperand, span: SeqSpan,
                 scale: float) -> torch.Tensor:
    if isinstance(k_cache, QuantizedKV):
        k = _quantized_context(k_cache, span.block_ids, span.seq_len, q.dtype)
        v = _quantized_context(v_cache, span.block_ids, span.seq_len, q.dtype)
        return _attend(q, k, v, scale, span.tree)
    k = _context(k_cache, span.block_ids, span.first_slot, span.seq_len)
    v = _context(v_cache, span.block_ids, span.first_slot, span.seq_len)
    if k.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    return _attend(q, k, v, scale, span.tree)
