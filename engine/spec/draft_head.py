"""EAGLE-3-style draft head: one decoder block over [token embedding ‖ fused target features]."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from engine.config import ModelConfig
from engine.cpu_linear import F32Linear, cpu_linears_available
from engine.rope import rope_inv_freq
from kernels.cpu_quant.f32_ops import supports

# The head trained for the embedded SmolLM2-135M-Instruct (recipe: docs/speculative.md).
DEFAULT_HEAD_PATH = Path(__file__).parent / "heads" / "smollm2-135m-instruct.safetensors"


@dataclass(frozen=True)
class DraftHeadConfig:
    """The head's shape: the target's layer dims, which target layers it fuses, its draft vocabulary size."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    feature_layers: tuple[int, ...]  # target layer outputs concatenated, in this order
    draft_vocab_size: int  # rows of the head's own LM head (frequency-ranked target ids, see d2t)
    target_vocab_size: int

    @classmethod
    def for_target(cls, target: ModelConfig, feature_layers: tuple[int, ...],
                   draft_vocab_size: int) -> DraftHeadConfig:
        return cls(target.hidden_size, target.intermediate_size, target.num_heads, target.num_kv_heads,
                   target.head_dim, target.rms_norm_eps, target.rope_theta, tuple(feature_layers),
                   min(draft_vocab_size, target.vocab_size), target.vocab_size)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DraftHeadConfig:
        fields = json.loads(text)
        fields["feature_layers"] = tuple(fields["feature_layers"])
        return cls(**fields)


def build_vocab_map(token_counts: torch.Tensor, draft_vocab_size: int) -> torch.Tensor:
    """d2t [S] int64: the S most frequent target ids, most frequent first (ties: lower id first)."""
    order = sorted(range(token_counts.numel()), key=lambda i: (-int(token_counts[i]), i))
    return torch.tensor(order[:draft_vocab_size], dtype=torch.int64)


def target_to_draft(d2t: torch.Tensor, target_vocab_size: int) -> torch.Tensor:
    """t2d [V] int64: the draft id of each target id, -1 for ids outside the subset."""
    t2d = torch.full((target_vocab_size,), -1, dtype=torch.int64, device=d2t.device)
    t2d[d2t] = torch.arange(d2t.numel(), device=d2t.device)
    return t2d


class RMSNorm(nn.Module):
    """Plain differentiable RMSNorm (the engine's norm module dispatches to inference kernels)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: x [..., T, D], cos/sin [T, D/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class DraftHead(nn.Module):
    """fuse(features) → g; block(emb, g) → a (the next step's feature); logits(a) over the draft vocabulary.

    The target's embedding is shared: callers pass token embeddings, so the head stores none. Its first
    attention input is 2H wide (normed embedding ‖ normed feature), the residual stream is the feature.
    """

    def __init__(self, config: DraftHeadConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        h, q, kv = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.fc = nn.Linear(len(c.feature_layers) * h, h, bias=False)
        self.embed_norm = RMSNorm(h, c.rms_norm_eps)
        self.feature_norm = RMSNorm(h, c.rms_norm_eps)
        self.qkv_proj = nn.Linear(2 * h, q + 2 * kv, bias=False)
        self.o_proj = nn.Linear(q, h, bias=False)
        self.post_attention_norm = RMSNorm(h, c.rms_norm_eps)
        self.gate_up_proj = nn.Linear(h, 2 * c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, h, bias=False)
        self.norm = RMSNorm(h, c.rms_norm_eps)
        self.lm_head = nn.Linear(h, c.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.arange(c.draft_vocab_size, dtype=torch.int64))
        self.register_buffer("inv_freq", rope_inv_freq(c.head_dim, c.rope_theta), persistent=False)

    def fuse(self, features: torch.Tensor) -> torch.Tensor:
        """Target layer outputs [..., F·H] → the head's feature space [..., H]."""
        return self.fc(features)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.to(self.inv_freq.dtype)[:, None] * self.inv_freq[None, :]
        return freqs.cos(), freqs.sin()

    def qkv(self, emb: torch.Tensor, g: torch.Tensor, positions: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """emb, g [B, T, H], positions [T] → rotated q [B, Hq, T, D], k and v [B, Hk, T, D]."""
        c = self.config
        b, t, _ = emb.shape
        x = torch.cat([self.embed_norm(emb), self.feature_norm(g)], dim=-1)
        heads = self.qkv_proj(x).view(b, t, c.num_heads + 2 * c.num_kv_heads, c.head_dim).transpose(1, 2)
        q, k, v = heads.split([c.num_heads, c.num_kv_heads, c.num_kv_heads], dim=1)
        cos, sin = self.rope(positions)
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def finish(self, g: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
        """Attention of q over (k, v) under the bool `mask` [Tq, Tk] (True = may attend), then the MLP; the
        residual stream starts at the feature g [B, Tq, H] → the block output a [B, Tq, H]."""
        c = self.config
        groups = c.num_heads // c.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0 / math.sqrt(c.head_dim))
        b, _, t, _ = out.shape
        x = g + self.o_proj(out.transpose(1, 2).reshape(b, t, c.num_heads * c.head_dim))
        gate, up = self.gate_up_proj(self.post_attention_norm(x)).chunk(2, dim=-1)
        return x + self.down_proj(F.silu(gate) * up)

    def logits(self, a: torch.Tensor) -> torch.Tensor:
        """Block outputs [..., H] → float32 logits over the draft vocabulary [..., S]."""
        return self.lm_head(self.norm(a)).float()

    def use_cpu_linears(self) -> int:
        """For drafting on CPU in fp32 (inference only: F32Linear has no gradient): the block's projections
        and the subset LM head run kernels/cpu_quant's f32_linear, as the target's do (a head forward's
        GEMVs cost ~1.3× the kernel's in MKL at one thread). `fc` stays a torch linear: callers read its
        weight's dtype. Returns the number swapped (0 off CPU fp32 or without a C compiler)."""
        names = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")
        weights = [getattr(self, name).weight for name in names]
        if not all(supports(w) for w in weights) or not cpu_linears_available():
            return 0
        for name, weight in zip(names, weights, strict=True):
            setattr(self, name, F32Linear(weight))
        return len(names)

    # ---- files ----

    def save(self, path: str | Path, dtype: torch.dtype = torch.bfloat16,
             metadata: dict[str, str] | None = None) -> None:
        """safetensors with the config (and any recipe notes) in its metadata; floats stored as `dtype`."""
        tensors = {name: (t.detach().to(dtype) if t.is_floating_point() else t.detach()).contiguous().cpu()
                   for name, t in self.state_dict().items()}
        save_file(tensors, str(path), metadata={"config": self.config.to_json(), **(metadata or {})})

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> DraftHead:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            config = DraftHeadConfig.from_json(f.metadata()["config"])
        head = cls(config)
        tensors = load_file(str(path))
        head.load_state_dict({k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()})
        return head.to(device).eval()


def train_attention_mask(length: int, step: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Training-time-test mask [L, (step+1)·L] for unroll step `step` over L = `length` rows: row t sees
    step 0's rows ≤ t (the target's real features) and its own rows of steps 1..step (its earlier drafts)."""
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    eye = torch.eye(length, dtype=torch.bool, device=device)
    return torch.cat([causal] + [eye] * step, dim=1)
