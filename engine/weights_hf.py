"""Read an HF Llama checkpoint directory: config.json → ModelConfig, *.safetensors → (name, tensor) pairs."""
from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from tqdm import tqdm

from engine.config import ModelConfig, RopeScaling
from engine.weights_gguf import UnsupportedModelError, Weights


def read_config(path: Path) -> ModelConfig:
    cfg = json.loads((Path(path) / "config.json").read_text())
    archs = set(cfg.get("architectures") or ["LlamaForCausalLM"])
    if not archs & {"LlamaForCausalLM", "MistralForCausalLM"}:
        raise UnsupportedModelError(f"architectures {sorted(archs)} not supported (Llama family only)")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise UnsupportedModelError("attention/mlp biases are not supported")
    hidden = int(cfg["hidden_size"])
    num_heads = int(cfg["num_attention_heads"])
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(int(t) for t in (eos if isinstance(eos, list) else [eos] if eos is not None else []))
    rope_params = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    return ModelConfig(
        name=str(cfg.get("_name_or_path") or Path(path).name),
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
        head_dim=int(cfg.get("head_dim") or hidden // num_heads),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        rope_theta=float(cfg.get("rope_theta") or rope_params.get("rope_theta") or 10000.0),
        rope_scaling=_rope_scaling(rope_params),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids,
    )


def _rope_scaling(params: dict) -> RopeScaling | None:
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return None
    if kind != "llama3":
        raise UnsupportedModelError(f"rope scaling {kind!r} is not supported (default or llama3)")
    return RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )


def read_checkpoint(path: Path, progress: bool = False) -> tuple[ModelConfig, Weights]:
    """Config plus a lazy stream of (HF parameter name, tensor) over every *.safetensors file."""
    return read_config(path), _iter_weights(path, progress)


def _iter_weights(path: Path, progress: bool) -> Weights:
    files = sorted(Path(path).glob("*.safetensors"))
    handles = [safe_open(str(f), framework="pt") for f in files]
    keys = [(h, k) for h in handles for k in h.keys()]  # noqa: SIM118 - safe_open handles are not dicts
    for handle, key in tqdm(keys, desc="loading weights", unit="tensor", disable=not progress):
        if key.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from the config
        yield key, handle.get_tensor(key)
