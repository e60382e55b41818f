"""Compiled quantized linear kernels equal their torch references at Llama-3-8B shapes, graph-safe."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from engine.quantize.int4 import quantize_int4
from engine.quantize.w8a8 import quantize_per_channel
from kernels.activation.kernel import silu_mul_triton
from kernels.quant_linear.act_quant import quantize_rows, silu_mul_quantize_rows
from kernels.quant_linear.common import grid, outputs
from kernels.quant_linear.config import (
    W4_CANDIDATES,
    W8_CANDIDATES,
    W8A8_CANDIDATES,
    QuantConfig,
    auto_split_k,
    fit_k,
)
from kernels.quant_linear.layout import W8Weight, pack_w4
from kernels.quant_linear.ops import silu_mul_w8a8_linear_triton
from kernels.quant_linear.reference import (
    dequantize_w4,
    int8_gemm_ref,
    quantize_rows_ref,
    silu_mul_quantize_rows_ref,
    w8_linear_ref,
)
from kernels.quant_linear.w4a16 import silu_mul_w4a16_linear, w4a16_linear
from kernels.quant_linear.w4a16_mma import w4a16_mma
from kernels.quant_linear.w8 import w8_linear
from kernels.quant_linear.w8a8 import int8_gemm, w8a8_linear

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]

DEV = torch.device("cuda")
BF16 = torch.bfloat16
SHAPES = [(6144, 4096), (4096, 14336)]  # qkv, down (Llama-3-8B)


@pytest.fixture(autouse=True)
def compiled_kernels_only() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter mode is on in this process: run tests/gpu in its own pytest process")


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max())


def weight(n: int, k: int) -> torch.Tensor:
    gen = torch.Generator(DEV).manual_seed(n + k)
    return torch.empty(n, k, dtype=BF16, device=DEV).normal_(std=0.02, generator=gen)


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("rows", [1, 7, 16, 300])
def test_w4a16_every_candidate_matches_the_reference(n: int, k: int, group: int, rows: int) -> None:
    w4 = pack_w4(*quantize_int4(weight(n, k), group))
    x = torch.randn(rows, k, dtype=BF16, device=DEV)
    ref = x.float() @ dequantize_w4(w4).t()
    bucket = "one" if rows == 1 else "few" if rows <= 16 else "many"
    for config in W4_CANDIDATES[bucket]:
        config = fit_k(auto_split_k(config, n, k), k)
        if config.block_m == 1 and config.block_k % group or config.mma and group % config.block_k:
            continue
        if config.stationary and k % config.block_k:  # it serves the K its slice divides
            continue
        assert rel_err(w4a16_linear(x, w4, config), ref) < 1e-2, config


@pytest.mark.parametrize("group", [32, 128])
def test_silu_mul_w4a16_every_stationary_candidate_equals_silu_mul_then_the_product(group: int) -> None:
    n, k = 4096, 14336  # down (Llama-3-8B), fed gate_up [1, 2K]
    w4 = pack_w4(*quantize_int4(weight(n, k), group))
    gate_up = torch.randn(1, 2 * k, dtype=BF16, device=DEV)
    act = silu_mul_triton(gate_up)
    for config in W4_CANDIDATES["one"]:
        if config.stationary and k % config.block_k == 0:  # each serves the K its slice divides
            fused = silu_mul_w4a16_linear(gate_up, w4, config)
            assert torch.equal(fused, w4a16_linear(act, w4, config)), config


def test_mma_ptx_dequantization_equals_its_plain_bit_operations() -> None:
    w4 = pack_w4(*quantize_int4(weight(4096, 4096), 128))
    x = torch.randn(16, 4096, dtype=BF16, device=DEV)
    config = QuantConfig(64, 128, 4, 4, block_m=16, mma=True)
    outs = []
    for ptx in (True, False):
        buffers = outputs(16, 4096, x, config)
        w4a16_mma(x, w4, config, buffers, grid(16, 4096, config), ptx=ptx)
        outs.append(buffers.out)
    assert torch.equal(outs[0], outs[1])
    assert rel_err(outs[0], x.float() @ dequantize_w4(w4).t()) < 1e-2


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_w8_every_candidate_matches_the_reference(n: int, k: int, rows: int) -> None:
    w8 = W8Weight(*quantize_per_channel(weight(n, k)))
    x = torch.randn(rows, k, dtype=BF16, device=DEV)
    ref = w8_linear_ref(x.float(), w8)
    for config in W8_CANDIDATES["one" if rows == 1 else "few"]:
        assert rel_err(w8_linear(x, w8, fit_k(auto_split_k(config, n, k), k)), ref) < 1e-2, config


def test_activation_quantization_matches_the_reference_bit_for_bit() -> None:
    x = torch.randn(300, 14336, dtype=BF16, device=DEV) * 3
    smooth = torch.rand(14336, device=DEV) + 0.5
    for inv, rotation in ((None, 1), (smooth, 1), (smooth, 128), (None, 2)):
        q, scale = quantize_rows(x, inv, rotation)
        q_ref, scale_ref = quantize_rows_ref(x, inv, rotation)
        # IEEE divisions and no fused multiply-adds in the kernel: the reference's roundings, bit for bit
        assert torch.equal(scale, scale_ref) and torch.equal(q, q_ref)


def test_silu_mul_quantization_matches_silu_mul_then_quantize_rows() -> None:
    gate_up = torch.randn(300, 2 * 14336, dtype=BF16, device=DEV) * 3  # Llama-3-8B's down input
    smooth = torch.rand(14336, device=DEV) + 0.5
    for inv, rotation in ((None, 1), (smooth, 1), (smooth, 128)):
        q, scale = silu_mul_quantize_rows(gate_up, inv, rotation_block=rotation)
        q_ref, scale_ref = silu_mul_quantize_rows_ref(gate_up, inv, rotation)
        torch.testing.assert_close(scale, scale_ref, rtol=1e-2, atol=0)  # a max one bf16 step apart, at most
        diff = (q.int() - q_ref.int()).abs()
        assert diff.max() <= 1 and diff.float().mean() < 1e-3


@pytest.mark.parametrize("m,n,k", [(2048, 6144, 4096), (333, 4096, 14336), (16, 4096, 4096)])
def test_int8_gemm_every_candidate_is_exact_up_to_the_scales(m: int, n: int, k: int) -> None:
    gen = torch.Generator(DEV).manual_seed(m)
    q_x = torch.randint(-127, 128, (m, k), generator=gen, device=DEV, dtype=torch.int8)
    x_scale = torch.rand(m, generator=gen, device=DEV)
    w8 = W8Weight(*quantize_per_channel(weight(n, k)))
    ref = int8_gemm_ref(q_x, x_scale, w8, torch.float32)
    for config in W8A8_CANDIDATES:  # a failure names its candidate (a bare mismatch did not, session 8)
        torch.testing.assert_close(int8_gemm(q_x, x_scale, w8, torch.float32, config), ref,
                                   atol=1e-4, rtol=1e-5, msg=lambda m, c=config: f"{c}: {m}")


def test_kernels_replay_from_a_cuda_graph() -> None:
    n, k = 4096, 4096
    w4 = pack_w4(*quantize_int4(weight(n, k), 32))
    w8 = W8Weight(*quantize_per_channel(weight(n, k)))
    x1, x16, x_big = (torch.randn(m, k, dtype=BF16, device=DEV) for m in (1, 16, 512))
    gate_up = torch.randn(512, 2 * k, dtype=BF16, device=DEV)
    calls = [lambda: w4a16_linear(x1, w4), lambda: w4a16_linear(x16, w4), lambda: w8_linear(x1, w8),
             lambda: w8_linear(x16, w8), lambda: w8a8_linear(x_big, w8),
             lambda: silu_mul_w8a8_linear_triton(gate_up, w8)]
    eager = [call() for call in calls]
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = [call() for call in calls]
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, captured, strict=True):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)  # split-K adds in any order


@pytest.mark.parametrize("rows", [1, 16])
def test_quantized_chain_replayed_under_pdl_equals_it_run_one_kernel_at_a_time(rows: int) -> None:
    # The quantized linears launch with programmatic dependent launch on Hopper (kernels/pdl.py), the one-row
    # ones reading their first weight tile before the wait. Run one kernel at a time (a sync after each) none
    # overlaps its predecessor; replayed from a graph they do. One row: the same math, bit-identical; 16 rows:
    # the w8 kernel adds its split-K partials atomically (any order), so the results agree to rounding.
    from kernels.rmsnorm.kernel import rms_norm_triton
    from tests.gpu.pdl_replay import stepped_and_replayed

    hidden, inner, layers = 4096, 2048, 4
    q, d, m = quantize_int4(weight(inner, hidden), 128)
    w4 = pack_w4(q, d, m)
    w8 = W8Weight(*quantize_per_channel(weight(hidden, inner)))
    norm_w = torch.randn(hidden, generator=torch.Generator(DEV).manual_seed(3), device=DEV, dtype=BF16)
    x = torch.randn(rows, hidden, generator=torch.Generator(DEV).manual_seed(4), device=DEV, dtype=BF16)

    def chain(sync: bool) -> torch.Tensor:
        settle = torch.cuda.synchronize if sync else lambda: None
        h, res = x, torch.zeros_like(x)
        for _ in range(layers):  # norm → W4A16 [hidden → inner] → w8 [inner → hidden]
            h, res = rms_norm_triton(h, norm_w, 1e-5, res)
            settle()
            h = w4a16_linear(h, w4)
            settle()
            h = w8_linear(h, w8)
            settle()
        return h

    expected, got = stepped_and_replayed(chain, DEV)
    if rows == 1:
        assert torch.equal(got, expected)
    else:
        assert rel_err(got, expected) < 1e-2
