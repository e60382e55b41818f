"""The tensor-core W4A16 kernel (interpreted on CPU, its PTX swapped for the same bit operations) equals the
torch reference; split-K merges in place and leaves its counters at zero; the default falls back by fit."""
from __future__ import annotations

import pytest
import torch

from engine.quantize.int4 import quantize_int4
from kernels.arrivals import arrival_counters
from kernels.quant_linear.config import W4_CANDIDATES, QuantConfig, bucket, pick
from kernels.quant_linear.layout import W4Weight, pack_w4
from kernels.quant_linear.reference import w4a16_linear_ref
from kernels.quant_linear.w4a16 import no_fit, w4a16_linear

pytestmark = pytest.mark.timeout(180)
HALF = torch.float16  # this Triton's interpreter gets tl.dot on bfloat16 wrong (bench/kernels/quant_common)


def w4_weight(n: int, k: int, group: int, seed: int) -> W4Weight:
    gen = torch.Generator().manual_seed(seed)
    return pack_w4(*quantize_int4(torch.randn(n, k, generator=gen) * 0.05, group))


def rows(m: int, k: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(HALF)


@pytest.mark.parametrize("m,group,config", [
    (1, 128, QuantConfig(32, 128, 1, 2, block_m=8, mma=True)),
    (1, 64, QuantConfig(16, 64, 1, 2, block_m=16, split_k=2, mma=True, partials=True)),  # merged in place
    (5, 128, QuantConfig(16, 64, 1, 3, block_m=16, split_k=2, mma=True)),  # atomic split-K, 2 steps a group
    (20, 256, QuantConfig(32, 128, 1, 2, block_m=16, split_k=2, mma=True, partials=True)),  # 2 row blocks
])
def test_mma_matches_the_reference(m: int, group: int, config: QuantConfig) -> None:
    weight = w4_weight(48, 512, group, seed=m)  # N = 48: a ragged last row block at block_n 32
    x = rows(m, 512)
    got = w4a16_linear(x, weight, config)
    assert got.dtype == HALF and got.shape == (m, 48)
    torch.testing.assert_close(got.float(), w4a16_linear_ref(x.float(), weight), atol=2e-3, rtol=2e-3)


def test_in_place_merge_resets_its_counters() -> None:
    weight = w4_weight(32, 256, 128, seed=3)
    x = rows(3, 256)
    config = QuantConfig(16, 64, 1, 2, block_m=8, split_k=4, mma=True, partials=True)
    first = w4a16_linear(x, weight, config)
    assert not arrival_counters(x.device, 1).any()  # the last split of each tile zeroed its counter
    assert torch.equal(w4a16_linear(x, weight, config), first)  # and the next launch merges alike


def test_leading_dims_and_an_offset_input_view() -> None:
    weight = w4_weight(16, 128, 64, seed=4)
    x = rows(2 * 3 * 132, 1).view(2, 3, 132)[..., 4:]  # rows start 8 bytes in: still int64 quads
    config = QuantConfig(16, 64, 1, 2, block_m=8, mma=True)
    got = w4a16_linear(x, weight, config)
    assert got.shape == (2, 3, 16)
    expected = w4a16_linear_ref(x.reshape(6, 128).float(), weight).view(2, 3, 16)
    torch.testing.assert_close(got.float(), expected, atol=2e-3, rtol=2e-3)


def test_what_the_mma_kernel_refuses() -> None:
    weight = w4_weight(16, 128, 32, seed=5)
    config = QuantConfig(16, 64, 1, 2, block_m=8, mma=True)
    assert "group size 32" in no_fit(rows(2, 128), weight, config)  # a step would straddle two groups
    with pytest.raises(ValueError, match="bf16 or fp16"):
        w4a16_linear(torch.randn(2, 128), w4_weight(16, 128, 64, seed=5), config)
    with pytest.raises(ValueError, match="quads"):
        w4a16_linear(rows(2, 130)[:, 1:129], w4_weight(16, 128, 64, seed=5), config)


@pytest.mark.parametrize("group", [32, 128])
def test_the_default_is_the_first_candidate_that_fits(group: int) -> None:
    weight = w4_weight(64, 256, group, seed=6)
    for m in (1, 4):
        x = rows(m, 256)
        config = pick(W4_CANDIDATES, m, 64, 256, lambda c, x=x: not no_fit(x, weight, c))
        first_fit = next(c for c in W4_CANDIDATES[bucket(m)] if not c.mma or group % c.block_k == 0)
        assert config.mma == first_fit.mma and not no_fit(x, weight, config)
        torch.testing.assert_close(w4a16_linear(x, weight).float(), w4a16_linear_ref(x.float(), weight),
                                   atol=2e-3, rtol=2e-3)
