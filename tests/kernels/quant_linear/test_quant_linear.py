"""Quantized linear kernels (interpreted on CPU) equal their torch references at small shapes."""
from __future__ import annotations

import pytest
import torch

from engine.quantize.int4 import dequantize_int4, quantize_int4
from kernels.activation.kernel import silu_mul_triton
from kernels.quant_linear.act_quant import quantize_rows, silu_mul_quantize_rows
from kernels.quant_linear.config import W4_CANDIDATES, W8A8_CANDIDATES, QuantConfig, auto_split_k, fit_k, pick
from kernels.quant_linear.layout import W4Weight, W8Weight, pack_w4, unpack_w4
from kernels.quant_linear.reference import (
    dequantize_w4,
    hadamard_blocks_ref,
    int8_gemm_ref,
    quantize_rows_ref,
    silu_mul_quantize_rows_ref,
    silu_mul_w4a16_linear_ref,
    w4a16_linear_ref,
    w8_linear_ref,
    w8a8_linear_ref,
)
from kernels.quant_linear.w4a16 import no_fit, silu_mul_w4a16_linear, w4a16_linear
from kernels.quant_linear.w4a16_stationary import blocks_per_program, register_cap
from kernels.quant_linear.w8 import w8_linear
from kernels.quant_linear.w8a8 import default_config, int8_gemm, w8a8_linear

pytestmark = pytest.mark.timeout(180)


def w4_weight(n: int, k: int, group: int, seed: int) -> W4Weight:
    gen = torch.Generator().manual_seed(seed)
    return pack_w4(*quantize_int4(torch.randn(n, k, generator=gen), group))


def w8_weight(n: int, k: int, seed: int) -> W8Weight:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    return W8Weight(q, torch.rand(n, generator=gen) * 0.01 + 1e-3)


def test_repack_keeps_our_w4a16_values() -> None:
    gen = torch.Generator().manual_seed(0)
    q, d, m = quantize_int4(torch.randn(24, 64, generator=gen), 32)
    packed = pack_w4(q, d, m)
    assert packed.packed.shape == (24, 32) and packed.group_size == 32 and packed.shape == (24, 64)
    assert torch.equal(unpack_w4(packed), q)
    # scale and low are stored as float16 (GGUF Q4_1's own d and m are float16, so those repack exactly)
    torch.testing.assert_close(dequantize_w4(packed), dequantize_int4(q, d.half(), m.half()))


@pytest.mark.parametrize("rows,config", [
    (1, QuantConfig(16, 64, 1, 1)), (1, QuantConfig(32, 32, 1, 1, split_k=2)),
    (1, QuantConfig(2, 128, 1, 1)), (1, QuantConfig(4, 64, 1, 5)),  # one step over all of K; 2-row blocks
    (1, QuantConfig(16, 32, 1, 1, split_k=4, partials=True)),  # merged in place
    (5, QuantConfig(16, 64, 1, 1, block_m=16)), (16, QuantConfig(32, 32, 1, 1, block_m=16, split_k=2)),
    (40, QuantConfig(16, 64, 1, 1, block_m=16)), (40, QuantConfig(32, 32, 1, 1, block_m=32, split_k=2)),
])
def test_w4a16_matches_the_reference(rows: int, config: QuantConfig) -> None:
    weight = w4_weight(40, 128, 32, seed=rows)  # N = 40: a ragged last row block
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(w4a16_linear(x, weight, config), w4a16_linear_ref(x, weight),
                               atol=1e-3, rtol=1e-3)


def test_w4a16_half_inputs_group_128_and_leading_dims() -> None:
    # float16, not bfloat16: this Triton's interpreter gets tl.dot on bfloat16 wrong (kernels/linear's too);
    # tests/gpu/test_quant_linear_cuda.py runs bfloat16 compiled.
    weight = w4_weight(32, 256, 128, seed=3)
    x = torch.randn(2, 3, 256, generator=torch.Generator().manual_seed(2)).half()
    got = w4a16_linear(x, weight, QuantConfig(16, 64, 1, 1, block_m=16))
    assert got.shape == (2, 3, 32) and got.dtype == torch.float16
    torch.testing.assert_close(got.float(), w4a16_linear_ref(x, weight).float(), atol=3e-2, rtol=2e-2)


@pytest.mark.parametrize("words", [False, True])
@pytest.mark.parametrize("group", [32, 128])
def test_w4a16_one_bf16_row_reads_the_input_as_pairs(group: int, words: bool) -> None:
    weight = w4_weight(24, 512, group, seed=group)  # N = 24: a ragged last row block of 16
    x = torch.randn(1, 512, generator=torch.Generator().manual_seed(9)).bfloat16()
    for config in (QuantConfig(8, 256, 1, 1, split_k=2, words=words),
                   QuantConfig(16, 512, 1, 1, words=words),
                   QuantConfig(16, 128, 1, 1, split_k=2, words=words, partials=True)):
        got = w4a16_linear(x, weight, config)
        torch.testing.assert_close(got.float(), w4a16_linear_ref(x, weight).float(), atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("n,config", [
    (24, QuantConfig(4, 256, 1, 1, stationary=True, per_sm=2)),  # 2 splits, one block a program
    (40, QuantConfig(8, 128, 1, 1, stationary=True, per_sm=1)),  # 4 splits merged in place, runs of 3 and 2
    (70, QuantConfig(4, 256, 1, 1, stationary=True, per_sm=1)),  # runs of 5, 5, 5, 3; a ragged last block
    (128, QuantConfig(16, 128, 2, 1, stationary=True, per_sm=3)),
    # the row-block loop pipelined (the interpreter runs it plain; tests/gpu runs every candidate)
    (70, QuantConfig(4, 256, 1, 2, stationary=True, per_sm=1)),  # ragged last block
])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_w4a16_stationary_gemv_matches_the_reference(n: int, config: QuantConfig, group: int) -> None:
    weight = w4_weight(n, 512, group, seed=n + group)
    x = torch.randn(1, 512, generator=torch.Generator().manual_seed(n)).bfloat16()
    for _ in range(2):  # the merge's arrival counters are back at zero for the next launch
        got = w4a16_linear(x, weight, config)
        torch.testing.assert_close(got.float(), w4a16_linear_ref(x, weight).float(), atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("group", [32, 128])
def test_w4a16_stationary_gemv_takes_silu_mul_in_its_prologue(group: int) -> None:
    weight = w4_weight(40, 256, group, seed=group)
    gate_up = torch.randn(1, 512, generator=torch.Generator().manual_seed(3)).bfloat16() * 3
    for config in (QuantConfig(8, 128, 1, 1, stationary=True, per_sm=1),  # 2 splits, each its own slice
                   QuantConfig(4, 256, 1, 1, stationary=True, per_sm=4)):
        got = silu_mul_w4a16_linear(gate_up, weight, config)
        # the same bf16 activation as the activation kernel's, so the same product bit for bit
        assert torch.equal(got, w4a16_linear(silu_mul_triton(gate_up), weight, config))
        # against torch's silu a bf16 activation may round the other way: a few output ulps (|y| ~ 250)
        expected = silu_mul_w4a16_linear_ref(gate_up, weight).float()
        torch.testing.assert_close(got.float(), expected, atol=2e-2 * expected.abs().max().item(), rtol=0)
    # more rows: the activation kernel, then the product (fp32: the interpreter's bf16 tl.dot is wrong)
    rows = gate_up.float().repeat(3, 1)
    expected = silu_mul_w4a16_linear_ref(rows, weight).float()
    torch.testing.assert_close(silu_mul_w4a16_linear(rows, weight).float(), expected,
                               atol=2e-2 * expected.abs().max().item(), rtol=0)


def test_stationary_programs_take_the_fewest_blocks_that_cover_the_rows() -> None:
    assert blocks_per_program(1024, 264) == 4 and blocks_per_program(1536, 128) == 12
    assert blocks_per_program(512, 75) == 7  # 74 programs, the last with 1 block (a divisor: 8, 64 programs)
    assert blocks_per_program(7, 2) == 4 and blocks_per_program(5, 8) == 1


def test_stationary_register_cap_lets_per_sm_programs_share_an_sm() -> None:
    assert register_cap(QuantConfig(4, 4096, 4, 1, stationary=True, per_sm=4)) == 128
    assert register_cap(QuantConfig(4, 4096, 4, 1, stationary=True, per_sm=5)) == 96  # 102, whole eights
    assert register_cap(QuantConfig(8, 4096, 8, 1, stationary=True, per_sm=1)) == 255


def test_w4a16_stationary_gemv_leaves_other_inputs_to_the_next_candidate() -> None:
    weight = w4_weight(16, 256, 32, seed=6)
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(11))  # fp32: not the stationary GEMV's
    with pytest.raises(ValueError, match="one bf16 row"):
        w4a16_linear(x, weight, QuantConfig(4, 256, 1, 1, stationary=True, per_sm=1))
    config = pick(W4_CANDIDATES, 1, 16, 256, lambda c: not no_fit(x, weight, c))
    assert not config.stationary
    torch.testing.assert_close(w4a16_linear(x, weight), w4a16_linear_ref(x, weight), atol=1e-3, rtol=1e-3)


def test_w4a16_word_configs_serve_inputs_other_than_bf16_from_the_bytes() -> None:
    weight = w4_weight(16, 256, 32, seed=5)
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(10))
    got = w4a16_linear(x, weight, QuantConfig(8, 128, 1, 1, words=True))
    torch.testing.assert_close(got, w4a16_linear_ref(x, weight), atol=1e-3, rtol=1e-3)


def test_w4a16_default_configs_serve_every_bucket() -> None:
    weight = w4_weight(64, 256, 32, seed=4)
    for rows in (1, 8, 20):
        x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))
        config = pick(W4_CANDIDATES, rows, 64, 256, lambda c, x=x: not no_fit(x, weight, c))
        assert 256 % (config.split_k * config.block_k) == 0
        torch.testing.assert_close(w4a16_linear(x, weight), w4a16_linear_ref(x, weight), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("rows,config", [
    (1, QuantConfig(16, 64, 1, 1)), (1, QuantConfig(8, 32, 1, 1, split_k=2)),
    (3, QuantConfig(16, 32, 1, 1, block_m=16)), (16, QuantConfig(32, 32, 1, 1, block_m=16, split_k=2)),
])
def test_w8_matches_the_reference(rows: int, config: QuantConfig) -> None:
    weight = w8_weight(40, 128, seed=rows)
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(w8_linear(x, weight, config), w8_linear_ref(x, weight), atol=1e-3, rtol=1e-3)


def test_w8_refuses_prefill_sized_inputs() -> None:
    with pytest.raises(ValueError, match="at most 16 rows"):
        w8_linear(torch.randn(17, 64), w8_weight(8, 64, seed=0))


def test_activation_quantization_matches_the_reference_bit_for_bit() -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 100, generator=gen) * torch.logspace(-2, 1, 6).unsqueeze(1)
    x[2] = 0.0  # an all-zero row divides by the smallest scale, not by zero
    inv_smooth = torch.rand(100, generator=gen) + 0.5
    for smooth, rotation in ((None, 1), (inv_smooth, 1), (None, 4), (inv_smooth, 4)):
        q, scale = quantize_rows(x, smooth, rotation)
        q_ref, scale_ref = quantize_rows_ref(x, smooth, rotation)
        assert torch.equal(scale, scale_ref) and torch.equal(q, q_ref)  # the same roundings in the same order
        assert q.abs().max() == 127 and not q[2].any()


def test_activation_quantization_rotates_in_blocks_of_up_to_the_row() -> None:
    """The butterflies in registers: blocks of 2 up to the whole (padded) row, and a block that divides K but
    leaves a masked tail in the power-of-two row (K = 96 in a row of 128)."""
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(4)) * 3
    for rotation in (2, 32):
        q, scale = quantize_rows(x, None, rotation)
        q_ref, scale_ref = quantize_rows_ref(x, None, rotation)
        assert torch.equal(scale, scale_ref) and torch.equal(q, q_ref)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(5))
    q, scale = quantize_rows(x, None, 64)
    # rotated back (H · H = 64 · I), the codes give x within half a step of the rotated row per feature
    dequantized = q.float() * scale.unsqueeze(1)
    back = hadamard_blocks_ref(dequantized, 64) / 64
    torch.testing.assert_close(back, x, atol=float(scale.max()) / 2, rtol=0)
    with pytest.raises(ValueError, match="Hadamard block 48 must be a power of two dividing K = 96"):
        quantize_rows(torch.randn(2, 96), None, 48)


@pytest.mark.parametrize("config", [QuantConfig(32, 32, 1, 1, block_m=16, group_m=2),
                                    QuantConfig(16, 64, 1, 1, block_m=32, group_m=1),
                                    QuantConfig(16, 64, 1, 1, block_m=32, group_m=2, tma=True)])
def test_int8_gemm_is_exact_up_to_the_scales(config: QuantConfig) -> None:
    gen = torch.Generator().manual_seed(6)
    m, n, k = 50, 72, 96  # ragged in M, N and (for block_k 64) K: tensor-memory copies zero what lies past
    q_x = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
    x_scale = torch.rand(m, generator=gen) * 0.1
    weight = w8_weight(n, k, seed=7)
    got = int8_gemm(q_x, x_scale, weight, torch.float32, config)
    torch.testing.assert_close(got, int8_gemm_ref(q_x, x_scale, weight, torch.float32), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_quantization_matches_silu_mul_then_quantize_rows(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(11)
    inter = 100  # not a power of two: the row's tail is masked
    gate_up = (torch.randn(2, 3, 2 * inter, generator=gen) * torch.logspace(-2, 1, 3).view(1, 3, 1)).to(dtype)
    gate_up[1, 1] = 0.0  # an all-zero row divides by the smallest scale, not by zero
    inv_smooth = torch.rand(inter, generator=gen) + 0.5
    for smooth, rotation in ((None, 1), (inv_smooth, 1), (inv_smooth, 4)):
        q, scale = silu_mul_quantize_rows(gate_up, smooth, rotation_block=rotation)
        q_ref, scale_ref = silu_mul_quantize_rows_ref(gate_up, smooth, rotation)
        assert q.shape == (6, inter) and scale.shape == (6,)
        # the silu's exp may differ from torch's in its last bit: an intermediate rounded the other way
        # moves the row's max (the scale) by at most one step of the 16-bit dtype, a code by at most one
        torch.testing.assert_close(scale, scale_ref, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=0)
        assert (q.int() - q_ref.int()).abs().max() <= 1
        assert q.abs().max() == 127 and not q[4].any()


def test_silu_mul_quantization_refuses_an_odd_gate_up() -> None:
    with pytest.raises(ValueError, match="2I"):
        silu_mul_quantize_rows(torch.randn(4, 7))


def test_w8a8_candidates_keep_a_pointer_fallback() -> None:
    assert any(not c.tma for c in W8A8_CANDIDATES)
    assert len(set(W8A8_CANDIDATES)) == len(W8A8_CANDIDATES)


def test_w8a8_linear_matches_the_reference() -> None:
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 10, 64, generator=gen)
    weight = w8_weight(48, 64, seed=9)
    got = w8a8_linear(x, weight, config=QuantConfig(16, 32, 1, 1, block_m=16))
    assert got.shape == (2, 10, 48)
    expected = w8a8_linear_ref(x.reshape(-1, 64), weight).view(2, 10, 48)
    # a code may round the other way at a tie: one step of x's scale times |w| summed, far below this bound
    torch.testing.assert_close(got, expected, atol=5e-3, rtol=5e-3)


def test_every_one_row_w4a16_candidate_fits_the_bench_shapes() -> None:
    for n, k in ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)):
        for config in W4_CANDIDATES["one"]:
            got = fit_k(auto_split_k(config, n, k), k)
            if got.stationary:  # keeps its K slice: serves the K it divides, else the next candidate does
                assert got == config and (k % got.block_k == 0) == (got.block_k <= 2048 or k == 4096)
                continue
            fits_groups = 128 % got.block_k == 0 if got.mma else got.block_k % 128 == 0
            assert k % (got.split_k * got.block_k) == 0 and fits_groups, (config, n, k)
        # a one-row bf16 product at every shape gets a stationary GEMV (the activation fused into down's)
        x = torch.empty(1, k, dtype=torch.bfloat16)
        scales = torch.empty(n, k // 128, dtype=torch.half)
        weight = W4Weight(torch.empty(n, k // 2, dtype=torch.uint8), scales, scales, 128)
        assert pick(W4_CANDIDATES, 1, n, k, lambda c, x=x, w=weight: not no_fit(x, w, c)).stationary


def test_w4a16_split_partials_serve_only_one_row() -> None:
    weight = w4_weight(16, 128, 32, seed=2)
    config = QuantConfig(16, 32, 1, 1, block_m=16, split_k=2, partials=True)
    with pytest.raises(ValueError, match="partials"):
        w4a16_linear(torch.randn(4, 128), weight, config)


def test_w8_refuses_in_place_split_partials() -> None:
    config = QuantConfig(16, 32, 1, 1, split_k=2, partials=True)
    with pytest.raises(ValueError, match="partials"):
        w8_linear(torch.randn(1, 64), w8_weight(16, 64, seed=3), config)


def test_w8a8_default_leaves_tma_tiles_to_hopper() -> None:
    q_x = torch.zeros(8, 64, dtype=torch.int8)  # a CPU tensor: no tensor-memory accelerator
    assert not default_config(q_x, w8_weight(16, 64, seed=1)).tma


def test_auto_split_k_fills_the_sms_within_k() -> None:
    one = auto_split_k(QuantConfig(32, 256, 4, 3, split_k=0), 4096, 14336)
    assert one.split_k == 4 and 14336 % (one.split_k * one.block_k) == 0  # 128 row blocks → 512 programs
    assert auto_split_k(QuantConfig(32, 256, 4, 3, split_k=0), 28672, 4096).split_k == 1
