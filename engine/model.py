"""Plain-torch Llama over a flat token batch and a paged KV cache (fused qkv and gate_up projections)."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention_metadata import AttentionMetadata
from engine.config import ModelConfig
from engine.kv_cache import KVCache
from engine.rope import RotaryEmbedding
from kernels.attention import paged_attention, store_kv
from kernels.rmsnorm import rms_norm
from kernels.rotary import apply_rotary

LayerHook = Callable[[int], None]


class WeightLoadError(ValueError):
    """A checkpoint tensor has no home in the model, the wrong shape, or a parameter was never loaded."""


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return rms_norm(x, self.weight, self.eps, residual)


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.scale = 1.0 / math.sqrt(config.head_dim)
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata, kv: KVCache,
        layer_hook: LayerHook | None,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, k, cos, sin)
        k_cache, v_cache = kv.k[self.layer_index], kv.v[self.layer_index]
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        if layer_hook is not None:
            # This layer's KV for the step is in the cache: the prefill side can start shipping it now.
            layer_hook(self.layer_index)
        out = paged_attention(q, k_cache, v_cache, meta, self.scale)
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate, inplace=True).mul_(up))  # in place: gate_up is a fresh buffer


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
        meta: AttentionMetadata, kv: KVCache, layer_hook: LayerHook | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The residual add rides along with the next norm (one pass over the activations).
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, cos, sin, meta, kv, layer_hook)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    """`forward` computes hidden states for a flat batch; `compute_logits` only for the rows that sample."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)
        # Tied: the LM head *is* the embedding matrix (no second copy to load or to read per token).
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(
            config.hidden_size, config.vocab_size, bias=False)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """[V, H]; for a tied model the embedding, even after the head was re-laid out for decode."""
        if self.config.tie_word_embeddings or self.lm_head is None:
            return self.embed_tokens.weight
        return self.lm_head.weight

    def init_buffers(self, device: torch.device | str) -> None:
        """Compute non-weight buffers (rope tables) in the model's dtype on `device`."""
        self.rotary.init_tables(self.embed_tokens.weight.dtype, torch.device(device))

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv: KVCache,
        layer_hook: LayerHook | None = None,
    ) -> torch.Tensor:
        """input_ids, positions [T] → final-normed hidden states [T, H]; stores each layer's KV into `kv`."""
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions)
        residual: torch.Tensor | None = None
        for layer in self.layers:
            h, residual = layer(h, residual, cos, sin, meta, kv, layer_hook)
        h, _ = self.norm(h, residual)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] → logits [N, V] in float32."""
        if self.lm_head is None:
            return F.linear(hidden, self.embed_tokens.weight).float()
        return self.lm_head(hidden).float()

    # ---- weights -----------------------------------------------------------------------------------------

    def _shards(self) -> dict[str, dict[str, tuple[int, int]]]:
        """Row ranges of checkpoint tensors inside our fused parameters."""
        c = self.config
        q, kv, inter = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
        return {
            "q_proj": ("qkv_proj", (0, q)),
            "k_proj": ("qkv_proj", (q, q + kv)),
            "v_proj": ("qkv_proj", (q + kv, q + 2 * kv)),
            "gate_proj": ("gate_up_proj", (0, inter)),
            "up_proj": ("gate_up_proj", (inter, 2 * inter)),
        }

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into our (partly fused) parameters; fail on anything unknown or missing."""
        params = dict(self.named_parameters())
        shards = self._shards()
        loaded: dict[str, int] = {}  # param name → rows written
        for name, tensor in weights:
            if name == "rope_freqs":
                self.rotary.set_freq_factors(tensor)
                continue
            name = name.removeprefix("model.")
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied checkpoints may still carry a (duplicate) head
            parts = name.split(".")
            rows: tuple[int, int] | None = None
            if len(parts) >= 2 and parts[-2] in shards:
                fused, rows = shards[parts[-2]]
                name = ".".join(parts[:-2] + [fused, parts[-1]])
            param = params.get(name)
            if param is None:
                raise WeightLoadError(f"checkpoint tensor {name!r} matches no model parameter")
            target = param if rows is None else param[rows[0]:rows[1]]
            if tuple(target.shape) != tuple(tensor.shape):
                raise WeightLoadError(
                    f"{name}: checkpoint shape {tuple(tensor.shape)} != {tuple(target.shape)}")
            target.copy_(tensor)
            loaded[name] = loaded.get(name, 0) + target.shape[0]
        missing = [n for n, p in params.items() if loaded.get(n, 0) != p.shape[0]]
        if missing:
            raise WeightLoadError(f"parameters not (fully) loaded from the checkpoint: {missing[:5]}"
                                  + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))


# ---- CPU decode layout (a transform over the loaded model; numerics unchanged) ----------------------------

class ColumnBlockLinear(nn.Module):
    """Bias-free linear whose weight is stored as `parts` column blocks [parts, in, out / parts].

    At bs1 decode every linear is a GEMV, which MKL runs on a single core and streams at ~half the memory
    bandwidth; one bmm over the blocks runs a GEMV per core, each reading its block row by row. Same math and
    output layout as nn.Linear; prefill pays one extra activation copy.
    """

    def __init__(self, weight: torch.Tensor, parts: int) -> None:
        super().__init__()
        out_features, in_features = weight.shape
        if out_features % parts:
            raise ValueError(f"out_features {out_features} is not divisible into {parts} blocks")
        self.in_features, self.out_features, self.parts = in_features, out_features, parts
        blocks = weight.detach().t().reshape(in_features, parts, out_features // parts).transpose(0, 1)
        self.weight_blocks = nn.Parameter(blocks.contiguous(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The dense [out, in] weight (a copy: the storage is blocked)."""
        return self.weight_blocks.transpose(0, 1).reshape(self.in_features, self.out_features).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        m = rows.shape[0]
        # [parts, m, out / parts]
        out = torch.bmm(rows.expand(self.parts, m, self.in_features), self.weight_blocks)
        # Block order is column order, so a single row is already in place; more rows need one transpose copy.
        out = out.view(1, self.out_features) if m == 1 else out.transpose(0, 1).reshape(m, self.out_features)
        return out if x.dim() == 2 else out.view(*x.shape[:-1], self.out_features)


def use_column_blocks(model: LlamaModel, parts: int) -> int:
    """Swap every projection and the LM head (a copy, if tied) to ColumnBlockLinear; returns the count."""
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None and child.out_features % parts == 0:
                setattr(module, name, ColumnBlockLinear(child.weight, parts))
                swapped += 1
    if model.lm_head is None and model.config.vocab_size % parts == 0:
        # The tied head gets its own blocked copy: the embedding lookup still needs the row layout.
        model.lm_head = ColumnBlockLinear(model.embed_tokens.weight, parts)
        swapped += 1
    return swapped
