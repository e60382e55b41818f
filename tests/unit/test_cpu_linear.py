"""engine/cpu_linear: F32Linear equals nn.Linear, and use_cpu_linears swaps every fp32 projection."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.cpu_decode import FlatDecoder
from engine.cpu_linear import F32Linear, use_cpu_linears
from engine.model import LlamaModel
from kernels.activation.reference import silu_mul_ref

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("rows", [1, 5])
def test_f32_linear_equals_dense_linear(rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(24, 16, generator=gen)
    x = torch.randn(rows, 16, generator=gen)
    linear = F32Linear(weight)
    torch.testing.assert_close(linear(x), F.linear(x, weight), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(linear(x.view(1, rows, 16)), F.linear(x, weight).view(1, rows, 24),
                               atol=1e-5, rtol=1e-5)
    assert torch.equal(linear.weight, weight)  # the packing round-trips exactly
    gate_up = torch.randn(rows, 32, generator=gen)
    torch.testing.assert_close(F32Linear(weight, silu_mul_input=True)(gate_up),
                               F.linear(silu_mul_ref(gate_up), weight), atol=1e-5, rtol=1e-5)


def test_f32_linear_takes_a_strided_single_row_and_names_what_it_cannot_take() -> None:
    weight = torch.randn(8, 8)
    x = torch.randn(1, 16)[:, ::2]
    torch.testing.assert_close(F32Linear(weight)(x), F.linear(x, weight), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="even row count"):
        F32Linear(torch.randn(7, 8))


def test_the_flat_decoders_product_adds_the_residual_and_keeps_rows_bitwise() -> None:
    weight, x, res = torch.randn(24, 16), torch.randn(6, 16), torch.randn(6, 24)
    linear = F32Linear(weight)
    out = FlatDecoder._gemv(linear, x, res)
    torch.testing.assert_close(out, F.linear(x, weight) + res, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[2:3], FlatDecoder._gemv(linear, x[2:3], res[2:3]))


def test_use_cpu_linears_swaps_every_projection_and_copies_the_tied_head() -> None:
    config = ModelConfig(name="t", vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2,
                         num_heads=2, num_kv_heads=1, head_dim=8, max_position_embeddings=64,
                         tie_word_embeddings=True)
    model = LlamaModel(config)
    dense = {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert use_cpu_linears(model) == 2 * 4 + 1  # 4 projections per layer + the tied head
    packed = {name: m for name, m in model.named_modules() if isinstance(m, F32Linear)}
    for name, weight in dense.items():
        assert torch.equal(packed[name].weight, weight)
    assert torch.equal(model.lm_head.weight, model.embed_tokens.weight)
    assert model.lm_head.packed.data_ptr() != model.embed_tokens.weight.data_ptr()
    storages = {m.packed.untyped_storage().data_ptr() for m in packed.values()}
    assert len(storages) == 1  # one (huge-page) arena holds every packed weight
