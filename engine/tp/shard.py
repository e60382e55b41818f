"""Sharding as a transform over the plain model (gpt-fast style): column-parallel qkv and gate_up,
row-parallel o and down (all-reduce after), vocab-parallel embedding and LM head; the rank's KV cache spec."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from contracts.kv_cache_spec import KVCacheSpec, scales_for
from engine.config import EngineConfig, ModelConfig
from engine.model import LlamaModel
from engine.tp.comm import TPComm
from engine.tp.heads import HeadShard, balanced_range, head_shard
from engine.tp.layers import RowParallel, VocabParallelEmbedding, VocabParallelHead
from kernels.linear.modules import Linear, SiluMulLinear


@dataclass(frozen=True)
class ShardPlan:
    """What one rank owns: heads (query and kv), MLP columns, vocab rows."""

    rank: int
    size: int
    heads: HeadShard
    intermediate: range
    vocab: range
    vocab_shares: tuple[int, ...]

    @classmethod
    def of(cls, config: ModelConfig, rank: int, size: int) -> ShardPlan:
        shares = tuple(len(balanced_range(config.vocab_size, r, size)) for r in range(size))
        return cls(rank, size, head_shard(config.num_heads, config.num_kv_heads, rank, size),
                   balanced_range(config.intermediate_size, rank, size),
                   balanced_range(config.vocab_size, rank, size), shares)

    def kv_cache_spec(self, config: ModelConfig, engine: EngineConfig) -> KVCacheSpec:
        """The rank's cache holds only its kv heads."""
        dtype = engine.resolved_kv_cache_dtype
        return KVCacheSpec(engine.block_size, len(self.heads.kv_heads), config.head_dim, dtype,
                           scales_for(dtype, config.head_dim))


def _linear(weight: torch.Tensor, cls: type[Linear] = Linear) -> Linear:
    with torch.device("meta"):
        module = cls(weight.shape[1], weight.shape[0])
    # A copy, not a view: the full tensor it was cut from must be free to go.
    module.weight = nn.Parameter(weight.clone(memory_format=torch.contiguous_format), requires_grad=False)
    return module


def _rows(heads: list[int], head_dim: int, offset: int) -> list[int]:
    return [offset + h * head_dim + i for h in heads for i in range(head_dim)]


@torch.no_grad()
def shard_model(model: LlamaModel, comm: TPComm, chunks: int = 1, min_chunk_tokens: int = 1) -> ShardPlan:
    """Replace `model`'s modules in place by this rank's shards (call before the engine binds its kernels);
    `chunks`/`min_chunk_tokens` set the row-parallel overlap (engine/tp/layers.py RowParallel)."""
    c = model.config
    plan = ShardPlan.of(c, comm.group.rank, comm.group.size)
    d, q_size, kv_size = c.head_dim, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    q_heads, kv_heads = list(plan.heads.q_heads), list(plan.heads.kv_heads)
    device = model.embed_tokens.weight.device
    kv_rows = _rows(kv_heads, d, q_size) + _rows(kv_heads, d, q_size + kv_size)
    qkv_rows = torch.tensor(_rows(q_heads, d, 0) + kv_rows, device=device)
    q_cols = torch.tensor(_rows(q_heads, d, 0), device=device)
    inter = plan.intermediate
    gate_up_rows = torch.cat([torch.arange(inter.start, inter.stop),
                              torch.arange(inter.start, inter.stop) + c.intermediate_size]).to(device)
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj = _linear(attn.qkv_proj.weight.index_select(0, qkv_rows))
        attn.o_proj = RowParallel(_linear(attn.o_proj.weight.index_select(1, q_cols)), comm, chunks,
                                  min_chunk_tokens)
        attn.num_heads, attn.num_kv_heads = len(q_heads), len(kv_heads)
        attn.q_size, attn.kv_size = len(q_heads) * d, len(kv_heads) * d
        mlp.gate_up_proj = _linear(mlp.gate_up_proj.weight.index_select(0, gate_up_rows))
        down = _linear(mlp.down_proj.weight[:, inter.start:inter.stop], SiluMulLinear)
        mlp.down_proj = RowParallel(down, comm, chunks, min_chunk_tokens)
    vocab = plan.vocab
    head_weight = model.lm_head_weight[vocab.start:vocab.stop]
    width = max(plan.vocab_shares)
    if head_weight.shape[0] < width:  # equal shares on the wire: the short rank's padding rows give zeros
        pad = head_weight.new_zeros(width - head_weight.shape[0], head_weight.shape[1])
        head_weight = torch.cat([head_weight, pad])
    embed = model.embed_tokens.weight[vocab.start:vocab.stop].clone()
    model.embed_tokens = VocabParallelEmbedding(embed, vocab.start, comm)
    head = _linear(head_weight)
    if c.tie_word_embeddings and head_weight.shape[0] == embed.shape[0]:
        head.weight = model.embed_tokens.weight  # still tied: one copy of the shard serves both
    model.lm_head = VocabParallelHead(head, list(plan.vocab_shares), comm)
    return plan
