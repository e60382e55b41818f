"""The linears a weight scheme replaces: every layer's qkv, o, gate_up and down projections (not the head)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from engine.model import LlamaModel
from kernels.linear.modules import SiluMulLinear


@dataclass(frozen=True)
class Projection:
    """One projection slot: `parent.<name>`, in layer `layer`; `silu_mul_input`: it is the MLP's down
    projection, fed gate_up (silu(gate) · up is applied before the product)."""

    layer: int
    parent: nn.Module
    name: str
    silu_mul_input: bool

    @property
    def module(self) -> nn.Module:
        return getattr(self.parent, self.name)

    def replace(self, module: nn.Module) -> None:
        setattr(self.parent, self.name, module)


def projections(model: LlamaModel) -> list[Projection]:
    """The four projections of every layer, in layer order. The LM head (tied to the embedding in the
    embedded model, Q8_0 in its GGUF) stays in float: it is read once per sampled row and is the most
    sensitive matrix to quantization error."""
    slots = []
    for i, layer in enumerate(model.layers):
        for parent, name in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"),
                             (layer.mlp, "gate_up_proj"), (layer.mlp, "down_proj")):
            slots.append(Projection(i, parent, name, isinstance(getattr(parent, name), SiluMulLinear)))
    return slots
