"""Perplexity of int4 KV format candidates (fake-quantized through the torch reference) vs fp32 KV."""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from unittest import mock

import torch

import kernels.rotary.reference as rotary_reference
from bench.quality.kv_cache_ppl import CONTEXT, default_text, perplexity
from engine.config import EngineConfig
from engine.model_files import load_model, resolve_model_path
from engine.quantize.calibration import calibration_text
from engine.tokenizer import Tokenizer
from kernels.store_kv.quant import INT4_MAX, MIN_SCALE, hadamard_matrix

CALIBRATION_TOKENS = 2048
BF16_BYTES = 2


@dataclass(frozen=True)
class Candidate:
    """One int4 format: how keys and values are grouped, and what keys lose before quantizing.

    Groups along head_dim are per token ("token"); KIVI's key groups are per channel over `key_group`
    consecutive positions ("channel"). `key_offset` subtracts a per-(layer, KV head) vector from every key
    first: free for attention (softmax ignores q·offset, the same for all keys of a query). "calibrated": the
    mean key over calibration text the evaluation does not use; "window": the mean over the scored window
    itself (an oracle, not causal); "first-block": the mean of the window's first 16 keys (per sequence).
    `refit`: least-squares refits of scale and zero to the codes (then codes again), per group."""

    name: str
    key_group: int = 32
    value_group: int = 64
    key_layout: str = "token"  # token | channel
    rotate: bool = True  # Hadamard-rotated rows (token layouts only)
    key_symmetric: bool = False  # scale only, no zero point
    key_offset: str = "none"  # none | calibrated | window | first-block
    refit: int = 0
    keys_fp32: bool = False  # diagnostic: only the values are quantized

    def bytes_per_token(self, kv_heads: int, head_dim: int) -> float:
        """int4 codes of k and v plus their float16 scales (and zeros), per token per layer."""
        codes = 2 * kv_heads * head_dim / 2
        if self.key_layout == "channel":
            key_scales = kv_heads * head_dim * 2 * 2 / self.key_group
        else:
            key_scales = kv_heads * head_dim / self.key_group * 2 * (1 if self.key_symmetric else 2)
        return codes + key_scales + kv_heads * head_dim / self.value_group * 2 * 2


CANDIDATES = (
    Candidate("current: keys 32 / values 64 per token, rotated"),
    Candidate("+ least-squares refit (2)", refit=2),
    Candidate("+ least-squares refit (5)", refit=5),
    Candidate("+ least-squares refit (10)", refit=10),
    Candidate("+ least-squares refit (20)", refit=20),
    Candidate("keys 16 symmetric, rotated", key_group=16, key_symmetric=True),
    Candidate("values only (keys fp32)", keys_fp32=True),
    Candidate("keys - first-block mean", key_offset="first-block"),
    Candidate("keys - window mean (oracle)", key_offset="window"),
    Candidate("keys - calibrated mean", key_offset="calibrated"),
    Candidate("keys - calibrated mean, refit (2)", key_offset="calibrated", refit=2),
    Candidate("keys - calibrated mean, refit (5)", key_offset="calibrated", refit=5),
    Candidate("KIVI keys per channel / 16 tokens", key_group=16, key_layout="channel"),
    Candidate("KIVI keys per channel / 32 tokens", key_group=32, key_layout="channel"),
    Candidate("KIVI keys per channel / 32 tokens, refit (2)", key_group=32, key_layout="channel", refit=2),
)


def fake_int4(x: torch.Tensor, group: int, refit: int = 0, symmetric: bool = False) -> torch.Tensor:
    """x [..., n] quantized per group of `group` values along the last axis and read back (float32):
    kernels/store_kv/quant.py's asymmetric format (float16 scale and zero), optionally refitted."""
    groups = x.float().unflatten(-1, (-1, group))
    if symmetric:
        # Codes -8..7 read as (code + 0.5) * scale: 16 levels at ±0.5..±7.5 steps, the ends at ±max.
        scale = (groups.abs().amax(-1, keepdim=True) / 7.5).clamp_min(MIN_SCALE).half().float()
        return ((torch.floor(groups / scale).clamp(-8, 7) + 0.5) * scale).flatten(-2)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = ((high - low) / INT4_MAX).clamp_min(MIN_SCALE).half().float()
    zero = low.half().float()
    codes = torch.floor((groups - zero) / scale + 0.5).clamp(0, INT4_MAX)
    for _ in range(refit):
        code_mean, mean = codes.mean(-1, keepdim=True), groups.mean(-1, keepdim=True)
        var = ((codes - code_mean) ** 2).sum(-1, keepdim=True)
        fitted = ((codes - code_mean) * (groups - mean)).sum(-1, keepdim=True) / var.clamp_min(1e-9)
        fitted = torch.where(var > 0, fitted, scale).clamp_min(MIN_SCALE)
        scale, zero = fitted.half().float(), (mean - fitted * code_mean).half().float()
        codes = torch.floor((groups - zero) / scale + 0.5).clamp(0, INT4_MAX)
    return (codes * scale + zero).flatten(-2)


def fake_quantize(c: Candidate, k: torch.Tensor, v: torch.Tensor,
                  offset: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One store's k, v [T, Hk, D] as the candidate would read them back."""
    h = hadamard_matrix(k.shape[-1], k.device)
    rotate = (lambda x: x @ h) if c.rotate else (lambda x: x)
    v_back = rotate(fake_int4(rotate(v.float()), c.value_group, c.refit))
    keys = k.float() - offset if offset is not None else k.float()
    if c.keys_fp32:
        return keys, v_back
    if c.key_layout == "token":
        return rotate(fake_int4(rotate(keys), c.key_group, c.refit, c.key_symmetric)), v_back
    tokens = keys.shape[0]
    pad = -tokens % c.key_group  # the last group repeats its last key (a prefill sees whole windows)
    padded = torch.cat([keys, keys[-1:].expand(pad, -1, -1)]) if pad else keys
    by_channel = padded.unflatten(0, (-1, c.key_group)).permute(0, 2, 3, 1)  # [groups, Hk, D, tokens]
    back = fake_int4(by_channel, c.key_group, c.refit).permute(0, 3, 1, 2).flatten(0, 1)
    return back[:tokens], v_back


class _Store:
    """Stands in for store_kv_ref: fake-quantizes each layer's rows (layers come in order) into a float32
    cache; records mean keys per layer when calibrating."""

    def __init__(self, num_layers: int, store: Callable) -> None:
        self.num_layers, self.store, self.calls = num_layers, store, 0
        self.candidate: Candidate | None = None
        self.offsets: list[torch.Tensor] | None = None
        self.key_sums = [torch.zeros(())] * num_layers
        self.key_count = 0

    def __call__(self, k, v, k_cache, v_cache, slots) -> None:
        layer = self.calls % self.num_layers
        self.calls += 1
        c = self.candidate
        if c is None:  # calibration: plain store, sum the keys
            self.key_sums[layer] = self.key_sums[layer] + k.float().sum(0)
            self.key_count += k.shape[0] if layer == 0 else 0
        else:
            offset = {"none": None, "window": k.float().mean(0), "first-block": k[:16].float().mean(0),
                      "calibrated": None if self.offsets is None else self.offsets[layer]}[c.key_offset]
            k, v = fake_quantize(c, k, v, offset)
        self.store(k, v, k_cache, v_cache, slots)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--only", nargs="*", default=None, help="candidate names (default: all)")
    args = parser.parse_args()
    path = resolve_model_path(None)
    model_config, model = load_model(path, "float32", "cpu")
    tokenizer = Tokenizer.from_model(path)
    ids = tokenizer.encode(default_text())[: args.tokens]
    config = EngineConfig(num_kv_blocks=-(-CONTEXT // 16), kv_cache_dtype="float32")
    store = _Store(model_config.num_layers, rotary_reference.store_kv_ref)
    candidates = [c for c in CANDIDATES if args.only is None or c.name in args.only]
    heads, dim = model_config.num_kv_heads, model_config.head_dim
    with mock.patch.object(rotary_reference, "store_kv_ref", store):
        if any(c.key_offset == "calibrated" for c in candidates):
            calibration = tokenizer.encode(calibration_text())[:CALIBRATION_TOKENS]
            for start in range(0, len(calibration) - 1, CONTEXT):
                perplexity(model, model_config, config, calibration[start:start + CONTEXT + 1])
            store.offsets = [total / store.key_count for total in store.key_sums]
        base = perplexity(model, model_config, config, ids)
        print(f"{len(ids)} tokens; fp32 KV ppl {base:.4f}; bytes / token / layer vs bf16 "
              f"{2 * heads * dim * BF16_BYTES}", flush=True)
        for c in candidates:
            store.candidate, store.calls = c, 0
            t0 = time.monotonic()
            ppl = perplexity(model, model_config, config, ids)
            size = c.bytes_per_token(heads, dim)
            print(f"{c.name:46s} {size:5.0f} B ({size / (2 * heads * dim * BF16_BYTES):.3f}x)  "
                  f"ppl {ppl:8.4f}  {100 * (ppl / base - 1):+.2f}%  ({time.monotonic() - t0:.0f}s)",
                  flush=True)


if __name__ == "__main__":
    main()
