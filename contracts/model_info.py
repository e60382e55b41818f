"""The served model's summary: a decode worker reports it, the router serves it in GetModelInfo."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelInfo:
    """What GetModelInfo reports; also gives router validation its context window and vocabulary size."""

    model_name: str
    context_length: int
    vocab_size: int
    kv_cache_dtype: str
    weight_dtype: str
    compute_dtype: str
    weights: str = "auto"  # the weight scheme the engine runs (EngineConfig.weights)
    speculative: str = "off"  # the decode workers' SpecConfig.describe(), e.g. "head k=5 adaptive"

    def __post_init__(self) -> None:
        if self.context_length < 2 or self.vocab_size < 1:
            raise ValueError(
                f"context_length ({self.context_length}) must be >= 2 and vocab_size ({self.vocab_size}) >= 1"
            )
