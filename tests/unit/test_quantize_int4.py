"""W4A16: Q4_1 blocks split exactly, the CPU module computes GGUF's formula in fp32, int4 round trips."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from engine.quantize.cpu_linears import Q41Linear
from engine.quantize.gguf_q4_1 import split_q4_1
from engine.quantize.int4 import dequantize_int4, quantize_int4
from engine.weights_gguf import dequantize
from kernels.cpu_quant.layout import pack_q4_1

pytestmark = pytest.mark.timeout(60)


def random_q4_1(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Arbitrary Q4_1 block bytes (every nibble occurs) with finite fp16 d and m."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, cols // 32, 20), dtype=np.uint8)
    fields = rng.normal(0, 0.05, size=(rows, cols // 32, 2)).astype(np.float16)
    raw[..., :4] = fields.view(np.uint8).reshape(rows, cols // 32, 4)
    return raw.reshape(rows, -1)


def test_q4_1_split_dequantizes_bit_exactly_like_gguf() -> None:
    raw = random_q4_1(96, 192)
    q, d, m = split_q4_1(raw, 96)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    ours = dequantize_int4(q, d, m)
    assert torch.equal(ours, dequantize(raw, GGMLQuantizationType.Q4_1, (96, 192)))
    theirs = torch.from_numpy(gguf_dequantize(raw, GGMLQuantizationType.Q4_1)).float()
    # gguf's numpy dequant computes d·q + m in fp32 too; allow one fp32 rounding of the sum either way.
    torch.testing.assert_close(ours, theirs, rtol=1.2e-7, atol=1e-9)


def test_q4_1_module_is_the_dequantized_fp32_product() -> None:
    """Q41Linear (kernels/cpu_quant, fp32 activations) over split GGUF blocks: the fp32 product of the
    dequantized weights up to summation order (tests/kernels/cpu_quant pins the kernel itself)."""
    torch.set_num_threads(1)
    raw = random_q4_1(64, 128, seed=1)
    q, d, m = split_q4_1(raw, 64)
    x = torch.randn(5, 128)
    out = Q41Linear(pack_q4_1(q, d, m))(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x @ dequantize_int4(q, d, m).t(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("group_size", [32, 128])
def test_float_weights_round_trip_within_half_a_step(group_size: int) -> None:
    weight = torch.randn(48, 256) * 0.02
    q, d, m = quantize_int4(weight, group_size)
    assert q.shape == weight.shape and d.shape == (48, 256 // group_size)
    err = (dequantize_int4(q, d, m) - weight).abs().reshape(48, -1, group_size)
    assert bool((err <= d.unsqueeze(-1) / 2 + 1e-7).all())
    x = torch.randn(3, 256)
    if group_size == 32:  # the CPU module's block size (GGUF's); it keeps d and m in float16 as GGUF does
        torch.testing.assert_close(Q41Linear(pack_q4_1(q, d, m))(x),
                                   x @ dequantize_int4(q, d.half(), m.half()).t(), rtol=1e-5, atol=1e-5)


def test_group_size_must_divide_in_features() -> None:
    with pytest.raises(ValueError, match="group size 128"):
        quantize_int4(torch.randn(8, 576), 128)


def test_down_projection_applies_silu_mul_first() -> None:
    q, d, m = quantize_int4(torch.randn(16, 64), 32)
    gate_up = torch.randn(2, 128)
    weight = pack_q4_1(q, d, m)
    expected = Q41Linear(weight)(torch.nn.functional.silu(gate_up[:, :64]) * gate_up[:, 64:])
    torch.testing.assert_close(Q41Linear(weight, silu_mul_input=True)(gate_up), expected)
