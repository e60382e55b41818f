"""The GGUF's Q8_0 LM head blocks as they are (the tied token embedding in the embedded model)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType

from engine.config import ModelConfig
from engine.weights_gguf import QK, open_reader
from kernels.cpu_quant.layout import Q80Weight, split_q8_0


def read_q8_0_head(path: Path, config: ModelConfig) -> Q80Weight | None:
    """The LM head's Q8_0 blocks — `output.weight`, or `token_embd.weight` where the model ties them (or the
    file has no output tensor); None when that tensor is not Q8_0 (the head then stays what the float
    loader built)."""
    tensors = {t.name: t for t in open_reader(path).tensors}
    name = "output.weight"
    if config.tie_word_embeddings or name not in tensors:
        name = "token_embd.weight"
    tensor = tensors.get(name)
    if tensor is None or tensor.tensor_type != GGMLQuantizationType.Q8_0:
        return None
    rows, cols = (int(d) for d in reversed(tensor.shape.tolist()))
    if cols % QK or rows != config.vocab_size:
        return None
    raw = torch.from_numpy(np.array(tensor.data, copy=True).reshape(-1).view(np.uint8))
    return split_q8_0(raw, rows)
