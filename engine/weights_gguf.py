"""Read a llama GGUF: config from its metadata, tensors dequantized in torch and renamed to HF names."""
from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.gguf_reader import ReaderTensor
from tqdm import tqdm

from engine.config import ModelConfig, RopeScaling


class UnsupportedModelError(ValueError):
    """The file is valid GGUF but holds an architecture, tensor type or rope variant we do not run."""


QK = 32  # elements per block of Q4_0 / Q4_1 / Q8_0

# GGUF tensor name (per layer part) → HF Llama parameter name.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "rope_freqs.weight": "rope_freqs",  # llama3 GGUFs store per-frequency divisors instead of scaling keys
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


class _PlainArrayReader(GGUFReader):
    """GGUFReader over a plain ndarray view of its memmap: parses the metadata ~3x faster.

    Every slice of an np.memmap is another np.memmap whose __array_finalize__ dominates parsing of the ~100k
    tokenizer strings; the view still reads the same mapping, nothing is copied.
    """

    @property
    def data(self) -> np.ndarray:
        return self._plain_data

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._plain_data = value.view(np.ndarray)


def open_reader(path: Path) -> GGUFReader:
    return _PlainArrayReader(path)


def _field(reader: GGUFReader, key: str, default: object = None) -> object:
    field = reader.get_field(key)
    return default if field is None else field.contents()


def read_config(path: Path) -> ModelConfig:
    return config_from_reader(open_reader(path), Path(path).stem)


def config_from_reader(reader: GGUFReader, fallback_name: str = "gguf") -> ModelConfig:
    """Map `llama.*` and `tokenizer.ggml.*` metadata to ModelConfig."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise UnsupportedModelError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    hidden = int(_field(reader, "llama.embedding_length"))
    num_heads = int(_field(reader, "llama.attention.head_count"))
    head_dim = int(_field(reader, "llama.attention.key_length", hidden // num_heads))
    names = {t.name for t in reader.tensors}
    vocab = _field(reader, "llama.vocab_size")
    if vocab is None:
        tokens = reader.get_field("tokenizer.ggml.tokens")
        vocab = len(tokens.data) if tokens is not None else None
    if vocab is None:
        raise UnsupportedModelError("GGUF has neither llama.vocab_size nor tokenizer.ggml.tokens")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    eot = _field(reader, "tokenizer.ggml.eot_token_id")
    eos_ids = tuple(dict.fromkeys(int(t) for t in (eos, eot) if t is not None))
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    return ModelConfig(
        name=str(_field(reader, "general.name", fallback_name)),
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        num_layers=int(_field(reader, "llama.block_count")),
        num_heads=num_heads,
        num_kv_heads=int(_field(reader, "llama.attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        max_position_embeddings=int(_field(reader, "llama.context_length", 2048)),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(reader),
        # llama.cpp drops output.weight when the head is tied to the embedding.
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=eos_ids,
    )


def _rope_scaling(reader: GGUFReader) -> RopeScaling | None:
    kind = _field(reader, "llama.rope.scaling.type", "none")
    if kind in ("none", None):
        return None  # llama3 scaling, if any, arrives as the rope_freqs tensor
    raise UnsupportedModelError(f"rope scaling type {kind!r} is not supported")


# ---- dequantization (vectorized torch; bit layouts follow ggml's block structs) ---------------------------

def _blocks(raw: torch.Tensor, type_size: int) -> torch.Tensor:
    return raw.reshape(-1, type_size)


def _f16_field(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    return blocks[:, offset:offset + 2].contiguous().view(torch.float16).float()  # [n, 1]


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    # ggml packs element j in the low nibble and j+16 in the high nibble of byte j.
    return torch.cat((qs & 0x0F, qs >> 4), dim=1)


def _dequant_q4_0(raw: torch.Tensor) -> torch.Tensor:
    b = _blocks(raw, 18)
    return _f16_field(b, 0) * (_nibbles(b[:, 2:]).to(torch.int8) - 8).float()


def _dequant_q4_1(raw: torch.Tensor) -> torch.Tensor:
    b = _blocks(raw, 20)
    return _f16_field(b, 0) * _nibbles(b[:, 4:]).float() + _f16_field(b, 2)


def _dequant_q8_0(raw: torch.Tensor) -> torch.Tensor:
    b = _blocks(raw, 34)
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16_field(b, 0)


_DEQUANT = {
    GGMLQuantizationType.Q4_0: _dequant_q4_0,
    GGMLQuantizationType.Q4_1: _dequant_q4_1,
    GGMLQuantizationType.Q8_0: _dequant_q8_0,
}


def _raw_bytes(data: np.ndarray) -> torch.Tensor:
    # Copy: the reader hands out read-only memmap views, which torch refuses to wrap without a warning.
    return torch.from_numpy(np.array(data, copy=True).reshape(-1).view(np.uint8))


_FLOAT_TYPES = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}


def dequantize(data: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw GGUF tensor data (as GGUFReader returns it) → float32 tensor of `shape` (rows, cols)."""
    raw = _raw_bytes(data)
    if qtype in _FLOAT_TYPES:
        return raw.view(_FLOAT_TYPES[qtype]).float().reshape(shape)
    fn = _DEQUANT.get(qtype)
    if fn is None:
        raise UnsupportedModelError(
            f"GGUF tensor type {qtype.name} is not supported (Q4_0/Q4_1/Q8_0/F16/BF16/F32)")
    return fn(raw).reshape(shape)


def tensor_to_torch(tensor: ReaderTensor) -> torch.Tensor:
    # GGUF lists dims fastest-first; torch wants (rows, cols).
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    return dequantize(tensor.data, tensor.tensor_type, shape)


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's converter permute of Q/K rows (interleaved-pair rope → HF rotate-half layout)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's converter permute (HF → GGUF); the inverse of `unpermute_qk`, kept for tests."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.match(gguf_name)
    if m is None or m.group(2) not in _LAYER_NAMES:
        raise UnsupportedModelError(f"unexpected GGUF tensor {gguf_name!r}")
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


Weights = Iterator[tuple[str, torch.Tensor]]


def read_checkpoint(path: Path, progress: bool = False) -> tuple[ModelConfig, Weights]:
    """Config plus a lazy stream of (HF parameter name, float32 tensor), Q/K un-permuted; one file parse."""
    reader = open_reader(path)  # parsing the metadata (tokenizer vocab) is the slow part: do it once
    config = config_from_reader(reader, Path(path).stem)
    return config, _iter_weights(reader, config, progress)


def _iter_weights(reader: GGUFReader, config: ModelConfig, progress: bool) -> Weights:
    tensors = tqdm(reader.tensors, desc="loading weights", unit="tensor", disable=not progress)
    for tensor in tensors:
        name = hf_name(tensor.name)
        w = tensor_to_torch(tensor)
        if name.endswith("q_proj.weight"):
            w = unpermute_qk(w, config.num_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_qk(w, config.num_kv_heads)
        yield name, w
