"""GGUF Q4_1 projection blocks as they are: (q, d, m) per fused projection, no float copy of the weights."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType

from engine.config import ModelConfig
from engine.weights_gguf import QK, open_reader, unpermute_qk

_Q4_1_BYTES = 20  # per block of 32: fp16 d, fp16 m, 16 bytes of nibbles

# Our fused projection → its GGUF tensors, in fused row order (as LlamaModel._shards lays them out).
_FUSED = {
    "qkv_proj": ("attn_q", "attn_k", "attn_v"),
    "o_proj": ("attn_output",),
    "gate_up_proj": ("ffn_gate", "ffn_up"),
    "down_proj": ("ffn_down",),
}

Q4Blocks = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # q uint8 [N, K] (0..15), d, m float32 [N, K/32]


def split_q4_1(raw: np.ndarray, rows: int) -> Q4Blocks:
    """Raw Q4_1 bytes of a [rows, K] tensor → (q, d, m) with w = d·q + m, ggml's block_q4_1 layout."""
    data = np.array(raw, copy=True).reshape(-1).view(np.uint8)  # copy: the reader's views are read-only
    blocks = torch.from_numpy(data).reshape(rows, -1, _Q4_1_BYTES)
    d = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1).float()
    m = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1).float()
    qs = blocks[..., 4:]
    # ggml packs element j in the low nibble and j+16 in the high nibble of byte j.
    q = torch.cat((qs & 0x0F, qs >> 4), dim=-1).reshape(rows, -1)
    return q, d, m


def read_q4_1_projections(path: Path, config: ModelConfig) -> dict[tuple[int, str], Q4Blocks] | None:
    """(layer, projection name) → its fused Q4_1 blocks, Q/K rows un-permuted like the float loader does;
    None when any projection tensor in the file is not Q4_1 (the caller then quantizes float weights)."""
    reader = open_reader(path)
    tensors = {t.name: t for t in reader.tensors}
    heads = {"attn_q": config.num_heads, "attn_k": config.num_kv_heads}
    out: dict[tuple[int, str], Q4Blocks] = {}
    for layer in range(config.num_layers):
        for fused, parts in _FUSED.items():
            pieces = []
            for part in parts:
                tensor = tensors.get(f"blk.{layer}.{part}.weight")
                if tensor is None or tensor.tensor_type != GGMLQuantizationType.Q4_1:
                    return None
                rows, cols = (int(d) for d in reversed(tensor.shape.tolist()))
                if cols % QK:
                    return None
                q, d, m = split_q4_1(tensor.data, rows)
                if part in heads:  # groups run along K, so un-permuting rows moves whole groups
                    q, d, m = (unpermute_qk(t, heads[part]) for t in (q, d, m))
                pieces.append((q, d, m))
            out[layer, fused] = tuple(torch.cat(column) for column in zip(*pieces, strict=True))
    return out
