"""int4 key balance: per-channel factors moved from the keys into the queries, folded into the qkv rows.

q · k is unchanged when a query's channel i is multiplied by c_i and the key's divided by it; RoPE rotates
channel pairs (i, i + D/2), so one factor serves a pair and the fold commutes with the rotation. An int4
store rounds each (offset-centred, Hadamard-rotated) key row on a grid as coarse as the row is large, so a
score's error grows with Σ c_i² E[q_i²] · Σ E[k̃_i²] / c_i² (k̃ the centred key): c moves quantization
error off the channels the queries weigh most. That product is least at c_i = (E[k̃_i²] / E[q_i²])^(1/4);
measured on four texts, half that exponent (KEY_BALANCE_EXPONENT) lowered both the perplexity and the
logits' KL divergence against a float cache, where the full one lowered only the perplexity
(docs/benchmarks.md, "int4 keys balanced against the queries").

The factors are calibrated on the model as it will serve (after its weight scheme) over the key offsets'
ids (engine/quantize/kv_offsets.py), per (layer, KV head) with the query heads of its group, geometric
mean 1, and rounded to 2^(1/32) steps so that workers whose float sums differ in the last bits fold the
same factors. One forward over those ids serves both: the balanced model's post-rotary keys are the
measured keys divided by c (RoPE commutes with a per-pair factor), so the offsets are the measured mean
key / c, where a second pass over the balanced model would differ only by the balanced weights' rounding.
The qkv projection's rows take them in whatever format the weight scheme left: float rows, or the per-row
(or per-group) scales of a quantized one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.model import LlamaModel
from engine.quantize.calibration import CALIBRATION_CONTEXT
from engine.quantize.cpu_linears import Q41Linear, Q80Linear
from engine.quantize.kernel_linears import W4A16KernelLinear, W8KernelLinear
from engine.quantize.kv_offsets import key_offsets
from engine.quantize.w8a8 import W8A8Linear
from engine.sequence_forward import prefill_cache
from kernels.linear.modules import Linear

KEY_BALANCE_EXPONENT = 0.125  # c = (E[k̃²] / E[q²]) ** this, per RoPE pair (see the module docstring)
KEY_BALANCE_STEPS = 32  # factors rounded to 2^(n / this)
_RATIO_BOUNDS = (1e-12, 1e12)  # a dead channel (no query or key energy) keeps a finite factor


class _QKVRecorder(nn.Module):
    """Stands in for a layer's qkv projection during calibration: sums the query heads' squared values per
    channel (pre-rotary: a RoPE pair's energy is the same either side of the rotation)."""

    def __init__(self, inner: nn.Module, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.inner, self.num_heads, self.head_dim = inner, num_heads, head_dim
        self.q_squares = torch.zeros(num_heads, head_dim, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        q = y[:, :self.num_heads * self.head_dim].reshape(-1, self.num_heads, self.head_dim)
        self.q_squares += q.double().square().sum(0).cpu()
        return y


def _pairs(energy: torch.Tensor) -> torch.Tensor:
    """[..., D] per channel → [..., D/2] per RoPE pair (i, i + D/2)."""
    half = energy.shape[-1] // 2
    return energy[..., :half] + energy[..., half:]


@dataclass(frozen=True)
class KeyStatistics:
    """Sums over one calibration pass (float64, CPU): query squares [L, H, D] (pre-rotary), post-rotary key
    sums and squares [L, Hk, D], over `count` tokens."""
    q_squares: torch.Tensor
    k_sums: torch.Tensor
    k_squares: torch.Tensor
    count: int


@torch.inference_mode()
def key_statistics(model: LlamaModel, token_ids: list[int]) -> KeyStatistics:
    """One pass over `token_ids` in windows of CALIBRATION_CONTEXT through a float32 cache."""
    layers = [layer.self_attn for layer in model.layers]
    if not token_ids:
        raise ValueError("key calibration needs at least one token")
    heads, kv_heads, dim = layers[0].num_heads, layers[0].num_kv_heads, layers[0].head_dim
    recorders = [_QKVRecorder(attn.qkv_proj, heads, dim) for attn in layers]
    k_sums = torch.zeros(len(layers), kv_heads, dim, dtype=torch.float64)
    k_squares = torch.zeros_like(k_sums)
    for attn, recorder in zip(layers, recorders, strict=True):
        attn.qkv_proj = recorder
    try:
        for start in range(0, len(token_ids), CALIBRATION_CONTEXT):
            window = token_ids[start:start + CALIBRATION_CONTEXT]
            _, kv = prefill_cache(model, window, "float32")
            keys = torch.stack([k.flatten(0, 1)[:len(window)] for k in kv.k]).cpu().double()  # [L, T, Hk, D]
            k_sums += keys.sum(1)
            k_squares += keys.square().sum(1)
    finally:
        for attn, recorder in zip(layers, recorders, strict=True):
            attn.qkv_proj = recorder.inner
    return KeyStatistics(torch.stack([r.q_squares for r in recorders]), k_sums, k_squares, len(token_ids))


def key_balance(stats: KeyStatistics) -> torch.Tensor:
    """The factors c [num_layers, num_kv_heads, head_dim] (float32, equal within each RoPE pair)."""
    layers, kv_heads, dim = stats.k_sums.shape
    heads = stats.q_squares.shape[1]
    count = stats.count
    mean_keys = stats.k_sums / count
    centred_keys = _pairs(stats.k_squares / count - mean_keys.square()).clamp_min(0)  # [L, Hk, D/2]
    queries = _pairs(stats.q_squares) / count  # [L, H, D/2]
    queries = queries.view(layers, kv_heads, heads // kv_heads, dim // 2).mean(2)
    log_c = KEY_BALANCE_EXPONENT * (centred_keys / queries).nan_to_num(1.0).clamp(*_RATIO_BOUNDS).log2()
    log_c = log_c - log_c.mean(-1, keepdim=True)  # geometric mean 1 per (layer, KV head)
    c = torch.exp2((log_c * KEY_BALANCE_STEPS).round() / KEY_BALANCE_STEPS).float()
    return torch.cat([c, c], dim=-1).contiguous()


def scale_output_rows(module: nn.Module, factors: torch.Tensor) -> None:
    """Multiply row n of a projection's weight by factors[n] in place, in the module's own format (float16
    scales round to float16)."""
    f = factors.to(torch.float32)
    if type(module) is Linear:
        w = module.weight.data
        w.copy_(w.float() * f.to(w.device).unsqueeze(1))
    elif isinstance(module, (Q41Linear, W4A16KernelLinear)):
        for name in ("d", "m") if isinstance(module, Q41Linear) else ("scale", "low"):
            t = getattr(module, name)
            t.copy_(t.float() * f.to(t.device).unsqueeze(1))
    elif isinstance(module, Q80Linear):
        module.d.mul_(f.to(module.d.device).unsqueeze(1))
    elif isinstance(module, (W8A8Linear, W8KernelLinear)):
        module.weight_scale.mul_(f.to(module.weight_scale.device))
    else:
        raise TypeError(f"key balance cannot scale the rows of a {type(module).__name__} projection")


def apply_key_balance(model: LlamaModel, balance: torch.Tensor) -> None:
    """Fold factors c [num_layers, num_kv_heads, head_dim] into every layer's qkv rows: each query head
    times its KV head's c, each key row divided by it, values untouched."""
    for layer, c in zip(model.layers, balance, strict=True):
        attn = layer.self_attn
        group = attn.num_heads // attn.num_kv_heads
        rows = torch.cat([c.repeat_interleave(group, 0).flatten(), (1.0 / c).flatten(),
                          torch.ones(attn.num_kv_heads * attn.head_dim)])
        scale_output_rows(attn.qkv_proj, rows)


def balance_keys(model: LlamaModel, token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """What an int4 engine does at start, in one calibration pass: fold the key balance into the model and
    return (factors c, the balanced keys' offsets: kv_offsets.key_offsets of the mean key / c)."""
    stats = key_statistics(model, token_ids)
    balance = key_balance(stats)
    apply_key_balance(model, balance)
    offsets = key_offsets(stats.k_sums / stats.count / balance.double(), model.embed_tokens.weight.device)
    return balance, offsets
