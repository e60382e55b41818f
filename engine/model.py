"""Plain-torch Llama over a flat token batch and a paged KV cache (fused qkv and gate_up projections)."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from engine.config import ModelConfig
from engine.kv_cache import KVCache
from engine.rope import RotaryEmbedding
from kernels.attention.metadata import AttentionMetadata
from kernels.linear.modules import Linear, SiluMulLinear
from kernels.registry import KernelRegistry

LayerHook = Callable[[int], None]


class WeightLoadError(ValueError):
    """A checkpoint tensor has no home in the model, the wrong shape, or a parameter was never loaded."""


class RMSNorm(nn.Module):
    kernels: KernelRegistry = Linear.kernels  # the torch references until bind_kernels

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return self.kernels.rms_norm(x, self.weight, self.eps, residual)


def norm_linear(norm: RMSNorm, proj: nn.Module, x: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(proj(norm(x + residual)), x + residual), one kernel for a CUDA decode row (the rms_norm_linear op);
    a projection a layout transform replaced (CPU column blocks) runs after the norm."""
    if type(proj) is Linear:
        return norm.kernels.rms_norm_linear(x, residual, norm.weight, norm.eps, proj.weight)
    if residual is None:
        return proj(norm(x)), x
    h, residual = norm(x, residual)
    return proj(h), residual


class LlamaAttention(nn.Module):
    kernels: KernelRegistry = Linear.kernels

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.scale = 1.0 / math.sqrt(config.head_dim)
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size)
        self.o_proj = Linear(self.q_size, config.hidden_size)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm, cos: torch.Tensor,
        sin: torch.Tensor, meta: AttentionMetadata, kv: KVCache, layer_hook: LayerHook | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention output, x + residual) for the layer input x and its norm."""
        num_tokens = x.shape[0]
        k_cache, v_cache = kv.layer(self.layer_index)  # tensors, or QuantizedKV with their scales
        if type(self.qkv_proj) is Linear:
            # Norm, qkv projection, rotary, KV store: one op (one kernel for a CUDA decode row).
            q, residual = self.kernels.rms_norm_qkv_rotary_store(
                x, residual, norm.weight, norm.eps, self.qkv_proj.weight, cos, sin, k_cache, v_cache,
                meta.slot_mapping, self.num_heads)
        else:  # a layout transform replaced the projection (CPU column blocks): call it as a module
            qkv, residual = norm_linear(norm, self.qkv_proj, x, residual)
            heads = qkv.view(num_tokens, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
            # split_with_sizes, not Tensor.split: the latter is a Python wrapper (CPU decode pays per call).
            q, k, v = heads.split_with_sizes([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
            q = self.kernels.rotary_store_kv(q, k, v, cos, sin, k_cache, v_cache, meta.slot_mapping)
        if layer_hook is not None:
            # This layer's KV for the step is in the cache: the prefill side can start shipping it now.
            layer_hook(self.layer_index)
        out = self.kernels.paged_attention(q, k_cache, v_cache, meta, self.scale)
        return self.o_proj(out.reshape(num_tokens, self.q_size)), residual


class LlamaMLP(nn.Module):
    kernels: KernelRegistry = Linear.kernels

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size)
        self.down_proj = SiluMulLinear(config.intermediate_size, config.hidden_size)  # takes gate_up

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None,
                norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """(MLP output, h + residual) for the attention output h and the norm before this MLP."""
        if type(self.gate_up_proj) is Linear and type(self.down_proj) is SiluMulLinear:
            # Norm, gate_up, silu(gate) · up, down: one op (the rms_norm_mlp op picks the fusions).
            return self.kernels.rms_norm_mlp(h, residual, norm.weight, norm.eps, self.gate_up_proj.weight,
                                self.down_proj.weight)
        # A layout transform replaced a projection (CPU column blocks): call the modules.
        gate_up, residual = norm_linear(norm, self.gate_up_proj, h, residual)
        return self.down_proj(gate_up), residual  # silu(gate) · up, then the down projection


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
        # The residual add rides along with the next norm, and the norm with the projection after it.
        h, residual = self.self_attn(x, residual, self.input_layernorm, cos, sin, meta, kv, layer_hook)
        return self.mlp(h, residual, self.post_attention_layernorm)


class LlamaModel(nn.Module):
    """`forward` computes hidden states for a flat batch; `compute_logits` only for the rows that sample.

    Every module that calls kernels reads them from its `kernels` registry: the torch references until the
    engine binds its own (`bind_kernels`, e.g. Triton on CUDA).
    """

    kernels: KernelRegistry = Linear.kernels

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)
        # Tied: the LM head *is* the embedding matrix (no second copy to load or to read per token).
        self.lm_head = None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size)

    def bind_kernels(self, kernels: KernelRegistry) -> None:
        """Serve every op of this model (and of modules a layout transform put in later, once bound again)
        from `kernels`."""
        for module in self.modules():
            if hasattr(type(module), "kernels"):
                module.kernels = kernels

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
        h, cos, sin = self.embed(input_ids, positions)
        h, residual = self.forward_layers(h, None, cos, sin, meta, kv, range(len(self.layers)), layer_hook)
        return self.final_norm(h, residual)

    # forward in three parts, for callers that run the layers in pieces (engine/cuda_graphs.py).

    def embed(self, input_ids: torch.Tensor,
              positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """→ (token embeddings [T, H], rope cos and sin [T, D/2]) shared by every layer."""
        cos, sin = self.rotary(positions)
        return self.embed_tokens(input_ids), cos, sin

    def forward_layers(
        self, h: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
        meta: AttentionMetadata, kv: KVCache, layers: range, layer_hook: LayerHook | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Runs layers[i] for i in `layers` (residual None before the first layer) → (h, residual)."""
        for i in layers:
            h, residual = self.layers[i](h, residual, cos, sin, meta, kv, layer_hook)
        return h, residual

    def final_norm(self, h: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        return self.norm(h) if residual is None else self.norm(h, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] → logits [N, V] in float32."""
        if self.lm_head is None:
            return self.kernels.linear(hidden, self.embed_tokens.weight).float()
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
