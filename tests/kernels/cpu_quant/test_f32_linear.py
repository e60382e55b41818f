"""kernels/cpu_quant f32_linear vs torch's fp32 product: M = 1..40, residual, threads, the scalar build, and
rows bit-identical at any row count (a verify row equals the bs1 step's)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.cpu_quant.f32_ops import f32_linear, pack_pairs, supports, unpack_pairs
from kernels.cpu_quant.library import BASE_FLAGS, library

pytestmark = pytest.mark.timeout(120)

# (N, K): tails of every tile shape (N / 2 pairs not a multiple of 2 or 4), the model's shapes.
SHAPES = [(2, 8), (14, 24), (38, 576), (22, 1536), (960, 576)]


def close(out: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """fp32 summation-order bound: K roundings of at most |x|·|w| each (+ the residual's one)."""
    bound = x.shape[-1] * torch.finfo(torch.float32).eps * (x.abs() @ w.abs().t() + ref.abs())
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert bool(((out - ref).abs() <= bound + 1e-30).all()), (out - ref).abs().max()


def test_pack_round_trips_and_supports_names_the_limits() -> None:
    w = torch.randn(6, 16)
    assert torch.equal(unpack_pairs(pack_pairs(w)), w)
    arena = torch.zeros(96)
    assert pack_pairs(w, arena).data_ptr() == arena.data_ptr()
    assert supports(w) and not supports(torch.randn(5, 16)) and not supports(torch.randn(6, 12))
    assert not supports(w.double())


@pytest.mark.parametrize(("n", "k"), SHAPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 40])
@pytest.mark.parametrize("threads", [1, 2])
def test_product_equals_torch_with_and_without_residual(n: int, k: int, rows: int, threads: int) -> None:
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(rows)
    w, x = torch.randn(n, k, generator=g), torch.randn(rows, k, generator=g)
    res = torch.randn(rows, n, generator=g)
    packed = pack_pairs(w)
    close(f32_linear(x, packed), F.linear(x, w), x, w)
    close(f32_linear(x, packed, res), F.linear(x, w) + res, x, w)


def test_a_row_is_the_same_bits_at_any_row_count_and_thread_count() -> None:
    """Output (r, n) is one accumulation in a fixed order whatever the tile that computes it."""
    w, x, res = torch.randn(38, 576), torch.randn(12, 576), torch.randn(12, 38)
    packed = pack_pairs(w)
    torch.set_num_threads(1)
    one = torch.cat([f32_linear(x[i:i + 1], packed, res[i:i + 1]) for i in range(12)])
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for rows in range(1, 13):
            assert torch.equal(f32_linear(x[:rows], packed, res[:rows]), one[:rows])


def test_prompt_sized_products_walk_row_chunks_with_the_same_bits() -> None:
    """Past F32_ROW_CHUNK (96) rows a product runs chunk by chunk (each in L2): rows keep their bits, the last
    chunk may be a single row (the one-row tile)."""
    torch.set_num_threads(2)
    w, x = torch.randn(10, 64), torch.randn(193, 64)
    packed = pack_pairs(w)
    whole = f32_linear(x, packed)
    for i in (0, 95, 96, 191, 192):
        assert torch.equal(whole[i:i + 1], f32_linear(x[i:i + 1], packed))
    close(whole, F.linear(x, w), x, w)


def test_leading_dims_and_non_contiguous_inputs_are_accepted() -> None:
    torch.set_num_threads(1)
    w = torch.randn(4, 64)
    x = torch.randn(2, 3, 128)[..., ::2]
    torch.testing.assert_close(f32_linear(x, pack_pairs(w)), F.linear(x, w), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="input has 128 features, the weight 64"):
        f32_linear(torch.randn(1, 128), pack_pairs(w))


def test_scalar_build_for_cpus_without_avx2_matches_torch() -> None:
    lib = library(BASE_FLAGS)  # no -mavx2: the source's #else path
    w = torch.randn(14, 24)
    packed = pack_pairs(w)
    for rows in (1, 3, 8):
        x, res = torch.randn(rows, 24), torch.randn(rows, 14)
        y = torch.empty(rows, 14)
        lib.f32_linear(x.data_ptr(), rows, 24, packed.data_ptr(), 14, res.data_ptr(), y.data_ptr(), 1)
        close(y, F.linear(x, w) + res, x, w)
