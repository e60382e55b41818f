"""GGUF reading: dequant equals gguf's, Q/K un-permute equals HF's, config keys and model paths map right."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from engine.weights_gguf import (
    UnsupportedModelError,
    dequantize,
    hf_name,
    permute_qk,
    unpermute_qk,
)

pytestmark = pytest.mark.timeout(60)

BLOCK_TYPES = [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0]


def random_raw_blocks(
    qtype: GGMLQuantizationType, rows: int, cols: int, rng: np.random.Generator
) -> np.ndarray:
    """Arbitrary block bytes (every nibble/int8 value occurs) with finite fp16 scale/min fields."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, type_size), dtype=np.uint8)
    num_f16 = 2 if qtype == GGMLQuantizationType.Q4_1 else 1  # Q4_1 carries (d, m), the others just d
    scales = rng.normal(0, 0.05, size=(rows, cols // block, num_f16)).astype(np.float16)
    raw[..., : 2 * num_f16] = scales.view(np.uint8).reshape(rows, cols // block, 2 * num_f16)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_block_dequant_matches_gguf_on_random_bytes(qtype: GGMLQuantizationType) -> None:
    rng = np.random.default_rng(0)
    raw = random_raw_blocks(qtype, rows=7, cols=96, rng=rng)
    expected = gguf_dequantize(raw, qtype)
    got = dequantize(raw, qtype, (7, 96))
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), expected)


@pytest.mark.parametrize("qtype", BLOCK_TYPES + [GGMLQuantizationType.BF16], ids=lambda t: t.name)
def test_dequant_of_quantized_random_weights_matches_gguf(qtype: GGMLQuantizationType) -> None:
    weights = np.random.default_rng(1).normal(size=(5, 128)).astype(np.float32)
    raw = gguf_quantize(weights, qtype)
    got = dequantize(raw, qtype, weights.shape)
    np.testing.assert_array_equal(got.numpy(), gguf_dequantize(raw, qtype).reshape(weights.shape))
    # and it is a faithful (lossy) copy of the original
    assert np.abs(got.numpy() - weights).max() < 0.5


@pytest.mark.parametrize("qtype,np_dtype", [(GGMLQuantizationType.F32, np.float32),
                                            (GGMLQuantizationType.F16, np.float16)])
def test_float_tensors_are_read_exactly(qtype: GGMLQuantizationType, np_dtype: type) -> None:
    data = np.random.default_rng(2).normal(size=(3, 40)).astype(np_dtype)
    got = dequantize(data, qtype, (3, 40))
    np.testing.assert_array_equal(got.numpy(), data.astype(np.float32))


def test_unsupported_tensor_type_raises_typed_error() -> None:
    raw = np.zeros((1, 144), dtype=np.uint8)
    with pytest.raises(UnsupportedModelError, match="Q4_K"):
        dequantize(raw, GGMLQuantizationType.Q4_K, (1, 256))


@pytest.mark.parametrize("n_heads,head_dim", [(9, 64), (3, 64), (4, 8)])
def test_unpermute_inverts_llama_cpp_permute_and_matches_hf(n_heads: int, head_dim: int) -> None:
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.randn(n_heads * head_dim, 24)
    torch.testing.assert_close(unpermute_qk(permute_qk(w, n_heads), n_heads), w, rtol=0, atol=0)
    # HF's GGUF loader undoes the same permute (K rows use the KV head count).
    processor = LlamaTensorProcessor(
        config={"num_attention_heads": 2 * n_heads, "num_key_value_heads": n_heads})
    hf = processor.process(w.numpy(), "blk.0.attn_k.weight").weights
    np.testing.assert_array_equal(unpermute_qk(w, n_heads).numpy(), hf)


def test_unpermute_moves_interleaved_rope_pairs_to_halves() -> None:
    # llama.cpp stores a head's rows as pairs (0, half), (1, half+1), ...; HF wants [0, half) then [half, D).
    head_dim = 8
    stored = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7], dtype=torch.float32).unsqueeze(1)
    assert unpermute_qk(stored, 1).flatten().tolist() == list(range(head_dim))


def test_tensor_names_map_to_hf_names() -> None:
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert hf_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    assert hf_name("output_norm.weight") == "model.norm.weight"
    with pytest.raises(UnsupportedModelError):
        hf_name("blk.0.attn_q_norm.weight")


def test_embedded_gguf_metadata_maps_to_model_config() -> None:
    from engine.model_files import embedded_model_path
    from engine.weights_gguf import read_config

    config = read_config(embedded_model_path())
    assert (config.num_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_heads, config.num_kv_heads, config.head_dim, config.vocab_size) == (9, 3, 64, 49152)
    assert config.rope_theta == 100000.0 and config.rope_scaling is None
    assert config.tie_word_embeddings and config.eos_token_ids == (2,) and config.bos_token_id == 1
    assert config.max_position_embeddings == 8192


def test_model_path_resolution_accepts_gguf_and_hf_dirs_and_names_what_is_wrong(tmp_path: Path) -> None:
    from engine.model_files import ModelPathError, embedded_model_path, resolve_model_path

    assert resolve_model_path(None) == embedded_model_path()
    assert embedded_model_path().suffix == ".gguf" and embedded_model_path().is_file()
    with pytest.raises(ModelPathError, match="does not exist"):
        resolve_model_path(str(tmp_path / "missing.gguf"))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelPathError, match="unsupported model file"):
        resolve_model_path(str(tmp_path / "weights.bin"))
    with pytest.raises(ModelPathError, match="no config.json"):
        resolve_model_path(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelPathError, match="safetensors"):
        resolve_model_path(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert resolve_model_path(str(tmp_path)) == tmp_path
