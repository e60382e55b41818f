"""The embedded model's Q4_1 blocks repacked once for the Triton W4A16 kernels (the CUDA path): the repacked
weights are exactly the float loader's, and the model on them computes what the float model does."""
from __future__ import annotations

import pytest
import torch

from engine.model_files import embedded_model_path, load_model
from engine.quantize import use_int4_kernels
from engine.quantize.kernel_linears import W4A16KernelLinear
from engine.quantize.projections import projections
from engine.sequence_forward import forward_sequence
from kernels.quant_linear.layout import W4Weight
from kernels.quant_linear.reference import dequantize_w4

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_q4_1_blocks_repack_for_the_kernels_bit_for_bit() -> None:
    torch.set_num_threads(1)
    config, model = load_model(None)
    floats = {(slot.layer, slot.name): slot.module.weight.detach().clone() for slot in projections(model)}
    tokens = [6403, 1980, 253, 655, 28, 281, 253, 1165, 6560, 418, 260, 5595]
    with torch.inference_mode():
        before = model.compute_logits(forward_sequence(model, tokens))
    assert "repacked" in use_int4_kernels(model, embedded_model_path())
    for slot in projections(model):
        module = slot.module
        assert type(module) is W4A16KernelLinear and module.group_size == 32  # Q4_1's block
        weight = W4Weight(module.packed, module.scale, module.low, module.group_size)
        assert torch.equal(dequantize_w4(weight), floats[slot.layer, slot.name]), (slot.layer, slot.name)
    with torch.inference_mode():  # the reference op: fp32 products over the same weights
        after = model.compute_logits(forward_sequence(model, tokens))
    torch.testing.assert_close(after, before, atol=1e-3, rtol=1e-3)
