"""The GPU benchmarks' shared start: without a CUDA device they say so and exit 2 (no traceback)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch


def cuda_missing(script: str) -> bool:
    """True, after saying so on stderr, when there is no CUDA device; `script`: the caller's __file__."""
    if torch.cuda.is_available():
        return False
    print(f"bench/{Path(script).name} needs a CUDA device", file=sys.stderr)
    return True
