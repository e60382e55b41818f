"""kernels/cpu_quant vs its torch references: layouts, products at M = 1..40, threads, the scalar build."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from kernels.cpu_quant import ops
from kernels.cpu_quant.layout import pack_q4_1, q8_0_of, split_q8_0, unpack_q4_1
from kernels.cpu_quant.library import BASE_FLAGS, CompilerMissingError, build, library
from kernels.cpu_quant.reference import (
    dequantize_q4_1_ref,
    dequantize_q8_0_ref,
    q4_1_linear_ref,
    q8_0_linear_ref,
)

pytestmark = pytest.mark.timeout(120)

# (N, K): N not a multiple of anything, K with a last half chunk (K % 64 == 32), the model's shapes.
SHAPES = [(13, 96), (37, 576), (24, 1536), (5, 32)]


def q4_1_weight(n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    d = torch.rand(n, k // 32, generator=g) * 0.02
    m = -torch.rand(n, k // 32, generator=g) * 0.1
    return q, pack_q4_1(q, d, m)


def q8_0_weight(n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    return q8_0_of(q, torch.rand(n, k // 32, generator=g) * 0.01)


def close(out: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """fp32 summation-order bound: K roundings of at most |x|·|w| each."""
    bound = x.shape[-1] * torch.finfo(torch.float32).eps * (x.abs() @ w.abs().t())
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert bool(((out - ref).abs() <= bound + 1e-30).all()), (out - ref).abs().max()


@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_q4_1_pack_round_trips_and_dequantizes_like_the_reference(n: int, k: int) -> None:
    q, weight = q4_1_weight(n, k)
    assert torch.equal(unpack_q4_1(weight), q)
    assert weight.packed.shape == (n, -(-k // 64) * 32)
    assert torch.equal(ops.dequantize_q4_1(weight), dequantize_q4_1_ref(weight))
    w8 = q8_0_weight(n, k)
    assert torch.equal(ops.dequantize_q8_0(w8), dequantize_q8_0_ref(w8))


@pytest.mark.parametrize(("n", "k"), SHAPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 9, 17, 40])
@pytest.mark.parametrize("threads", [1, 2])
def test_products_equal_the_dequantized_fp32_product(n: int, k: int, rows: int, threads: int) -> None:
    torch.set_num_threads(threads)
    _, w4 = q4_1_weight(n, k, seed=rows)
    w8 = q8_0_weight(n, k, seed=rows)
    x = torch.randn(rows, k)
    close(ops.q4_1_linear(x, w4), q4_1_linear_ref(x, w4), x, dequantize_q4_1_ref(w4))
    close(ops.q8_0_linear(x, w8), q8_0_linear_ref(x, w8), x, dequantize_q8_0_ref(w8))


def test_a_row_is_the_same_bits_at_any_row_count_and_thread_count() -> None:
    """A verify step's rows equal the bs1 step's (and 2 threads equal 1): each output row is computed by
    the same operations in the same order."""
    _, w4 = q4_1_weight(50, 576)
    w8 = q8_0_weight(50, 576)
    x = torch.randn(8, 576)
    torch.set_num_threads(1)
    one = [torch.cat([f(x[i:i + 1], w) for i in range(8)]) for f, w in ((ops.q4_1_linear, w4),
                                                                         (ops.q8_0_linear, w8))]
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for rows in (2, 5, 8):
            assert torch.equal(ops.q4_1_linear(x[:rows], w4), one[0][:rows])
            assert torch.equal(ops.q8_0_linear(x[:rows], w8), one[1][:rows])


def test_leading_dims_and_non_contiguous_inputs_are_accepted() -> None:
    torch.set_num_threads(1)
    _, w4 = q4_1_weight(16, 64)
    x = torch.randn(2, 3, 128)[..., ::2]
    torch.testing.assert_close(ops.q4_1_linear(x, w4), q4_1_linear_ref(x, w4), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="input has 128 features, the weight 64"):
        ops.q4_1_linear(torch.randn(1, 128), w4)


def test_q8_0_blocks_split_like_gguf_dequantizes_them() -> None:
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(7, 3, 34), dtype=np.uint8)
    raw[..., :2] = rng.normal(0, 0.05, size=(7, 3, 1)).astype(np.float16).view(np.uint8)
    weight = split_q8_0(torch.from_numpy(raw.reshape(-1)), 7)
    expected = torch.from_numpy(gguf_dequantize(raw.reshape(7, -1), GGMLQuantizationType.Q8_0)).float()
    assert torch.equal(dequantize_q8_0_ref(weight), expected)


def test_scalar_build_for_cpus_without_avx2_matches_the_reference() -> None:
    lib = library(BASE_FLAGS)  # no -mavx2: the source's #else path
    assert lib.cpu_quant_has_avx2() == 0
    _, w4 = q4_1_weight(13, 96)
    w8 = q8_0_weight(13, 96)
    for rows in (1, 3, 8):
        x = torch.randn(rows, 96)
        y4, y8 = torch.empty(rows, 13), torch.empty(rows, 13)
        lib.q4_1_linear(x.data_ptr(), rows, 96, w4.packed.data_ptr(), w4.d.data_ptr(), w4.m.data_ptr(), 13,
                        y4.data_ptr(), 1)
        lib.q8_0_linear(x.data_ptr(), rows, 96, w8.q.data_ptr(), w8.d.data_ptr(), 13, y8.data_ptr(), 1)
        close(y4, q4_1_linear_ref(x, w4), x, dequantize_q4_1_ref(w4))
        close(y8, q8_0_linear_ref(x, w8), x, dequantize_q8_0_ref(w8))


def test_simd_build_is_the_one_served_on_this_cpu() -> None:
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("this CPU has no AVX2")
    assert ctypes.CDLL(str(build())).cpu_quant_has_avx2() == 1


def test_missing_compiler_is_named_at_build() -> None:
    with pytest.raises(CompilerMissingError, match="need `no-such-cc` on PATH"):
        build(("-O0", "-shared", "-fPIC", "-DNEVER_BUILT"), compiler="no-such-cc")
