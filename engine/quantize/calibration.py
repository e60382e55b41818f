"""SmoothQuant calibration: per-input-feature max|x| of every projection, over text the evaluation never uses.

The text is the docstrings of a fixed list of standard-library modules (English prose about Python's library),
deliberately not `pydoc_data.topics` (the language reference bench/quality/ppl.py scores on).
"""
from __future__ import annotations

import importlib
import inspect
import logging

import torch
import torch.nn.functional as F
from torch import nn

from engine.model import LlamaModel
from engine.quantize.projections import Projection, projections
from engine.sequence_forward import forward_sequence
from kernels.activation.reference import silu_mul_ref

logger = logging.getLogger(__name__)

CALIBRATION_MODULES = ("argparse", "collections", "json", "logging", "pathlib", "subprocess", "textwrap",
                       "unittest", "functools", "itertools", "threading", "datetime", "csv", "shutil")
CALIBRATION_WINDOWS = 4
CALIBRATION_CONTEXT = 512


def calibration_text() -> str:
    """Each CALIBRATION_MODULES docstring, then its public members' docstrings, in a fixed order."""
    parts = []
    for name in CALIBRATION_MODULES:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for member_name, member in sorted(vars(module).items()):
            if not member_name.startswith("_") and getattr(member, "__module__", None) == name:
                parts.append(inspect.getdoc(member) or "")
    return "\n\n".join(p for p in parts if p)


class _AbsMaxObserver(nn.Module):
    """Stands in for a projection during calibration: records max|input| per feature, computes the product."""

    def __init__(self, slot: Projection) -> None:
        super().__init__()
        self.weight = slot.module.weight
        self.silu_mul_input = slot.silu_mul_input
        self.absmax = torch.zeros(self.weight.shape[1], dtype=torch.float32, device=self.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.silu_mul_input:
            x = silu_mul_ref(x)
        torch.maximum(self.absmax, x.reshape(-1, x.shape[-1]).abs().amax(0).float(), out=self.absmax)
        return F.linear(x, self.weight)


@torch.inference_mode()
def activation_absmax(model: LlamaModel, token_ids: list[int]) -> list[tuple[Projection, torch.Tensor]]:
    """Run the model over token_ids (windows of CALIBRATION_CONTEXT, at most CALIBRATION_WINDOWS) and return
    each projection slot with its per-input-feature max|x|; the model's projections are restored after."""
    slots = projections(model)
    originals = [slot.module for slot in slots]
    observers = [_AbsMaxObserver(slot) for slot in slots]
    for slot, observer in zip(slots, observers, strict=True):
        slot.replace(observer)
    try:
        step = CALIBRATION_CONTEXT
        windows = [token_ids[i:i + step] for i in range(0, len(token_ids), step)][:CALIBRATION_WINDOWS]
        for window in windows:
            forward_sequence(model, window)
    finally:
        for slot, original in zip(slots, originals, strict=True):
            slot.replace(original)
    logger.info("W8A8 calibration: %d tokens of stdlib docstrings",
                sum(len(w) for w in windows))
    return [(slot, observer.absmax) for slot, observer in zip(slots, observers, strict=True)]
