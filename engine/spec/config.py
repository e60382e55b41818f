"""How the engine speculates (EngineConfig.spec): which drafter, how many drafts, adaptive k."""
from __future__ import annotations

from dataclasses import dataclass

# off: plain decoding; ngram: prompt lookup (no model); head: the learned EAGLE-3-style draft head.
SPEC_METHODS = ("off", "ngram", "head")


@dataclass(frozen=True)
class SpecConfig:
    """`k`: most drafts per verify step. `adaptive`: each request drafts between 1 and k tokens, following
    an EWMA of how many of its drafts the target accepted (engine/spec/adaptive.py). `head_path`: the head's
    safetensors (method head); None = the head shipped for the embedded model."""

    method: str = "off"
    k: int = 5
    head_path: str | None = None
    adaptive: bool = True

    def __post_init__(self) -> None:
        if self.method not in SPEC_METHODS:
            raise ValueError(f"spec method must be one of {SPEC_METHODS}, got {self.method!r}")
        if not 1 <= self.k <= 16:
            raise ValueError(f"spec k must be in 1..16, got {self.k}")
        if self.head_path is not None and self.method != "head":
            raise ValueError(f"a draft head path is for spec method 'head', not {self.method!r}")

    @property
    def enabled(self) -> bool:
        return self.method != "off"

    def describe(self) -> str:
        """One line for ModelInfo / logs, e.g. "head k=5 adaptive" or "off"."""
        if not self.enabled:
            return "off"
        return f"{self.method} k={self.k}" + (" adaptive" if self.adaptive else "")
