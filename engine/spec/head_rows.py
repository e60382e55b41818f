"""The draft head's block over padded rows of several sequences whose head KV lives in slot buffers."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.spec.draft_head import DraftHead, RMSNorm, rotate


def _norm(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm's x · rsqrt(mean(x²) + eps) · weight as one fused op: these rows run in CUDA graphs where
    each of the module's five elementwise kernels costs a launch slot."""
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)


def logits_rows(head: DraftHead, a: torch.Tensor) -> torch.Tensor:
    """DraftHead.logits with the fused norm: block outputs [..., H] → float32 logits [..., S]."""
    return head.lm_head(_norm(head.norm, a)).float()


def block_rows(head: DraftHead, emb: torch.Tensor, g: torch.Tensor, positions: torch.Tensor,
               ctx_k: torch.Tensor, ctx_v: torch.Tensor, write_at: torch.Tensor,
               seen: torch.Tensor) -> torch.Tensor:
    """DraftHead.qkv then DraftHead.finish for B sequences at once, each over its own KV buffer.

    emb, g [B, T, H]: token embeddings and features; positions [B, T]: each row's RoPE position. The rows'
    k, v are written into ctx_k / ctx_v [B, Hk, L, D] at rows write_at [B, T] (in place: a slot view), then
    each query row attends to the buffer rows where seen [B, T, L] is True → block outputs a [B, T, H].

    The same math as the per-sequence path; the attention groups the queries of each KV head instead of
    repeating the keys (finish's repeat_interleave would copy the whole padded buffer every call), q and k
    rotate in one pass, and the norms are fused (`_norm`): fewer kernels in the graphs, same formulas."""
    c = head.config
    b, t, _ = g.shape
    groups = c.num_heads // c.num_kv_heads
    x = torch.cat([_norm(head.embed_norm, emb), _norm(head.feature_norm, g)], dim=-1)
    heads = head.qkv_proj(x).view(b, t, c.num_heads + 2 * c.num_kv_heads, c.head_dim).transpose(1, 2)
    qk, v = heads.split([c.num_heads + c.num_kv_heads, c.num_kv_heads], dim=1)
    cos, sin = head.rope(positions.reshape(-1))  # [B·T, D/2]
    qk = rotate(qk, cos.view(b, 1, t, -1), sin.view(b, 1, t, -1))
    q, k = qk.split([c.num_heads, c.num_kv_heads], dim=1)
    index = write_at[:, None, :, None].expand(b, c.num_kv_heads, t, c.head_dim)
    ctx_k.scatter_(2, index, k.to(ctx_k.dtype))
    ctx_v.scatter_(2, index, v.to(ctx_v.dtype))
    # Query head h reads KV head h // groups: [B, Hk·groups, T, D] → [B, Hk, groups·T, D], mask alike.
    grouped = q.reshape(b, c.num_kv_heads, groups * t, c.head_dim)
    mask = seen[:, None, None].expand(b, 1, groups, t, seen.shape[-1]).reshape(b, 1, groups * t, -1)
    out = F.scaled_dot_product_attention(grouped, ctx_k, ctx_v, attn_mask=mask,
                                         scale=1.0 / math.sqrt(c.head_dim))
    out = out.reshape(b, c.num_heads, t, c.head_dim)
    # From here DraftHead.finish's lines: output projection, residual from g, the MLP.
    x = g + head.o_proj(out.transpose(1, 2).reshape(b, t, c.num_heads * c.head_dim))
    gate, up = head.gate_up_proj(_norm(head.post_attention_norm, x)).chunk(2, dim=-1)
    return x + head.down_proj(F.silu(gate) * up)


def accept_rows(head: DraftHead, embed: nn.Embedding, ctx_k: torch.Tensor, ctx_v: torch.Tensor,
                last: torch.Tensor, g: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor,
                committed: torch.Tensor, accepted: torch.Tensor) -> None:
    """HeadDrafter.accept_fused for B sequences: row j of sequence b (j < accepted[b]) is position
    committed[b] + j with its next token tokens[b, j] and fused feature g[b, j]; its k, v land at row
    lengths[b] + j of the sequence's buffer and it sees the rows before and itself; last[b] [H] becomes
    the output of its last accepted row (kept where accepted[b] is 0).

    Padded rows (j >= accepted[b]) are computed too and write past the accepted rows, where nothing reads
    before the next accept overwrites them: the buffers need `T` spare rows after the longest sequence."""
    b, t, _ = g.shape
    steps = torch.arange(t, device=g.device)
    write_at = lengths[:, None] + steps  # [B, T]
    context = torch.arange(ctx_k.shape[2], device=g.device)
    seen = context[None, None, :] <= write_at[:, :, None]  # causal over the sequence's own rows
    emb = embed(tokens).to(g.dtype)
    a = block_rows(head, emb, g, committed[:, None] + steps, ctx_k, ctx_v, write_at, seen)
    final = a[torch.arange(b, device=g.device), (accepted - 1).clamp_min(0)]  # [B, H]
    last.copy_(torch.where((accepted > 0)[:, None], final.to(last.dtype), last))


def propose_rows(head: DraftHead, embed: nn.Embedding, ctx_k: torch.Tensor, ctx_v: torch.Tensor,
                 last: torch.Tensor, lengths: torch.Tensor, committed: torch.Tensor, k: int,
                 limit: int | None = None) -> torch.Tensor:
    """HeadDrafter.propose(k), greedy, for B sequences → drafts [B, k] int64 (target ids). Draft j's head
    row runs at position committed + j - 1 and writes its k, v at row lengths + j - 1, past the accepted
    rows (scratch: the next accept overwrites it), so the buffers need k - 1 spare rows."""
    d2t = head.d2t if limit is None else head.d2t[:limit]
    context = torch.arange(ctx_k.shape[2], device=last.device)

    def next_draft(a: torch.Tensor) -> torch.Tensor:
        logits = logits_rows(head, a)  # [B, S] float32
        if limit is not None:
            logits = logits[:, :limit]
        return d2t[logits.argmax(dim=-1)]

    drafts = [next_draft(last)]
    a = last.unsqueeze(1)  # [B, 1, H]
    for j in range(1, k):
        write_at = (lengths + (j - 1))[:, None]  # [B, 1]
        seen = context[None, None, :] <= write_at[:, :, None]
        emb = embed(drafts[-1][:, None]).to(a.dtype)
        a = block_rows(head, emb, a, (committed + (j - 1))[:, None], ctx_k, ctx_v, write_at, seen)
        drafts.append(next_draft(a[:, -1]))
    return torch.stack(drafts, dim=1)
