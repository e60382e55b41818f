"""The registry's quantized linear ops and the modules that call them: Triton (interpreted on CPU, row bucket
picked per call) equals the torch references, at small shapes in every bucket."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.quantize import use_int4_kernels, use_w8, use_w8a8
from engine.quantize.int4 import quantize_int4
from engine.quantize.kernel_linears import W4A16KernelLinear, W8A8KernelLinear, W8KernelLinear
from engine.quantize.w8a8 import quantize_per_channel, rotated_weight
from engine.random_models import PRESETS, build_random_model
from engine.sequence_forward import forward_sequence
from kernels.quant_linear.config import bucket
from kernels.quant_linear.layout import W8Weight, pack_w4
from kernels.registry import KernelRegistry

pytestmark = pytest.mark.timeout(300)

N, K = 40, 256  # N = 40: a ragged last row block for every candidate's block_n


def float_weight(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


def modules(kind: str, n: int, k: int, silu_mul_input: bool) -> torch.nn.Module:
    weight = float_weight(n, k, seed=n + k)
    if kind.startswith("w4a16"):
        return W4A16KernelLinear(pack_w4(*quantize_int4(weight, int(kind.split("g")[1]))), silu_mul_input)
    if kind == "w8":
        return W8KernelLinear(W8Weight(*quantize_per_channel(weight)), silu_mul_input)
    smooth = torch.rand(k, generator=torch.Generator().manual_seed(5)) + 0.5
    rotated, block = rotated_weight(weight, smooth)
    return W8A8KernelLinear(W8Weight(*quantize_per_channel(rotated)), 1.0 / smooth, block, silu_mul_input)


@pytest.mark.parametrize("rows", [1, 5, 20])  # the one / few / many buckets
@pytest.mark.parametrize("kind", ["w4a16-g32", "w4a16-g128", "w8", "w8a8"])
def test_triton_op_of_every_bucket_matches_the_reference(kind: str, rows: int) -> None:
    assert bucket(rows) == ("one", "few", "many")[[1, 5, 20].index(rows)]
    module = modules(kind, N, K, silu_mul_input=False)
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows))
    module.kernels = KernelRegistry.reference()
    expected = module(x)
    module.kernels = KernelRegistry.triton()
    got = module(x)
    assert got.shape == (rows, N) and got.dtype == x.dtype
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=2e-3)
    # and each is the float product within its quantization error (W8A8: smoothed and rotated, which the
    # weight undoes; int4 rounds a Gaussian weight to ~9% (g = 32) or 10–14% (g = 128) of its norm, int8 ~1%)
    exact = x @ float_weight(N, K, seed=N + K).t()
    bound = {"w4a16-g32": 0.12, "w4a16-g128": 0.15}.get(kind, 0.02)
    assert float((got - exact).norm() / exact.norm()) < bound


@pytest.mark.parametrize("kind", ["w4a16-g32", "w8", "w8a8"])
def test_down_projection_module_applies_silu_mul_and_others_keep_leading_dims(kind: str) -> None:
    module = modules(kind, 24, 128, silu_mul_input=True)
    gate_up = torch.randn(6, 256, generator=torch.Generator().manual_seed(7))  # [T, 2I], as the MLP feeds it
    module.kernels = KernelRegistry.reference()
    expected = module(gate_up)
    # the reference module on silu(gate) · up computes the same product as the fused input path
    plain = modules(kind, 24, 128, silu_mul_input=False)
    plain.kernels = KernelRegistry.reference()
    torch.testing.assert_close(plain(torch.nn.functional.silu(gate_up[..., :128]) * gate_up[..., 128:]),
                               expected)
    module.kernels = plain.kernels = KernelRegistry.triton()
    torch.testing.assert_close(module(gate_up), expected, atol=2e-3, rtol=2e-3)
    x = torch.randn(2, 3, 128, generator=torch.Generator().manual_seed(8))
    got = plain(x)
    assert got.shape == (2, 3, 24)
    torch.testing.assert_close(got.reshape(6, 24), plain(x.reshape(6, 128)))


def test_w8a8_down_projection_quantizes_gate_up_in_one_op_without_a_16_bit_activation() -> None:
    module = modules("w8a8", 24, 128, silu_mul_input=True)
    gate_up = torch.randn(2, 3, 256, generator=torch.Generator().manual_seed(9))
    module.kernels = KernelRegistry.reference()
    expected = module(gate_up)

    def no_silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the W8A8 down projection must not run silu_mul on its own")

    module.kernels = dataclasses.replace(KernelRegistry.triton(), silu_mul=no_silu_mul)
    got = module(gate_up)
    assert got.shape == (2, 3, 24)
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=2e-3)


def test_registry_names_the_quantized_ops_in_both_backends() -> None:
    reference, triton = KernelRegistry.reference(), KernelRegistry.triton()
    for op in ("w4a16_linear", "silu_mul_w4a16_linear", "w8_linear", "w8a8_linear", "silu_mul_w8a8_linear"):
        assert getattr(reference, op).__name__ == f"{op}_ref"
        assert getattr(triton, op).__name__ == f"{op}_triton"


@pytest.mark.parametrize("scheme", ["w4a16", "w8", "w8a8"])
def test_a_quantized_model_on_the_triton_registry_matches_its_reference_modules(scheme: str) -> None:
    """The CUDA engine's path end to end (every op Triton, projections the kernel modules), interpreted."""
    model = build_random_model(PRESETS["tiny"], torch.float32, "cpu")
    {"w4a16": lambda: use_int4_kernels(model, None), "w8": lambda: use_w8(model),
     "w8a8": lambda: use_w8a8(model, None, kernel_modules=True)}[scheme]()
    tokens = list(range(1, 18))  # 17 rows: past the few-rows bucket
    with torch.inference_mode():
        expected = model.compute_logits(forward_sequence(model, tokens))
        model.bind_kernels(KernelRegistry.triton())
        got = model.compute_logits(forward_sequence(model, tokens))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
