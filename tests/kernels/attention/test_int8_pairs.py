"""The int8 pairs decode kernel (kernels/attention/int8_decode.py; interpreted on CPU, its PTX swapped for
the same values by shifts) equals the reference over the same int8 blocks, within the split-K kernel's own
rounding; its scaling by powers of two keeps tiny and large rows exact; operands it cannot take go to the
split-K kernel."""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

import kernels.attention.kernel as attention
from kernels.attention.config import INT8_CAST, INT8_PAIRS
from kernels.attention.int8_decode import pairs, pairs_fit
from kernels.attention.kernel import paged_attention_triton, paged_decode_attention
from kernels.attention.reference import paged_attention_ref
from tests.kernels.attention.test_quantized_attention import HEAD_DIM, quantized
from tests.kernels.attention.test_triton_attention import make_batch

pytestmark = pytest.mark.timeout(300)
SCALE = HEAD_DIM ** -0.5


@pytest.fixture
def pair_launches(monkeypatch) -> list[int]:
    """Counts the pairs kernel's launches through kernel._launch_decode."""
    calls: list[int] = []
    launch = attention.launch_int8_pairs

    def counted(*args, **kwargs):
        calls.append(1)
        return launch(*args, **kwargs)

    monkeypatch.setattr(attention, "launch_int8_pairs", counted)
    return calls


@triton.jit
def _pairs_kernel(src, lo_ptr, hi_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    lo, hi = pairs(tl.load(src + offs), False)
    tl.store(lo_ptr + offs, lo)
    tl.store(hi_ptr + offs, hi)


def test_every_code_pair_converts_exactly() -> None:
    codes = torch.arange(-128, 128, dtype=torch.int8)
    grid = torch.stack(torch.meshgrid(codes, codes, indexing="ij"), -1).reshape(-1, 2).contiguous()
    lo, hi = (torch.empty(grid.shape[0], dtype=torch.float16) for _ in range(2))
    _pairs_kernel[(1,)](grid.view(torch.int16).flatten(), lo, hi, N=grid.shape[0])
    assert torch.equal(lo, grid[:, 0].half()) and torch.equal(hi, grid[:, 1].half())


def int8_batch(seqs, heads: int = 4, kv_heads: int = 2, seed: int = 0, dtype: torch.dtype = torch.float16,
               k_gain: float = 1.0, v_gain: float = 1.0):
    q, k_cache, v_cache, meta = make_batch(seqs, heads, kv_heads, HEAD_DIM, 4, True, seed)
    k, v = quantized(k_cache * k_gain, "int8"), quantized(v_cache * v_gain, "int8")
    return q.to(dtype), k, v, meta


def assert_near_the_reference(got: torch.Tensor, q, k, v, meta, baseline: torch.Tensor) -> None:
    """got within twice the split-K kernel's own distance from the fp32 reference, plus a little of the
    output's scale (both round a dot operand to 16 bits)."""
    expected = paged_attention_ref(q.float(), k, v, meta, SCALE)
    bound = 2 * (baseline.float() - expected).abs().max().item() + 1e-3 * expected.abs().max().item()
    assert (got.float() - expected).abs().max().item() <= bound


@pytest.mark.parametrize("splits", [1, 3, 9])  # 9 > the in-place merge's limit: the reduce kernel merges
def test_pairs_decode_matches_the_reference(splits: int, pair_launches: list[int]) -> None:
    # a ragged tail, an empty sequence, one key, a context split nine ways
    q, k, v, meta = int8_batch([(3, 1), (29, 1), (0, 1), (71, 1), (1, 1)], seed=splits)
    assert pairs_fit(q, k.codes)
    baseline = paged_decode_attention(q, k, v, meta, SCALE, num_splits=splits, int8_mode=INT8_CAST)
    got = paged_decode_attention(q, k, v, meta, SCALE, num_splits=splits, int8_mode=INT8_PAIRS)
    assert pair_launches == [1]
    assert_near_the_reference(got, q, k, v, meta, baseline)


@pytest.mark.parametrize("gain", [1e-6, 3e3])
def test_tiny_and_large_rows_keep_their_precision(gain: float, pair_launches: list[int]) -> None:
    # values and queries far outside float16's comfortable range: the powers of two bring them back; a
    # plain cast of the query or of p·scale to float16 would overflow (3e3 squared) or flush to zero (1e-6)
    q, k, v, meta = int8_batch([(40, 1), (13, 1)], seed=2, v_gain=gain)
    q = q * gain
    got = paged_decode_attention(q, k, v, meta, SCALE / gain, num_splits=2, int8_mode=INT8_PAIRS)
    expected = paged_attention_ref(q.float(), k, v, meta, SCALE / gain)
    assert pair_launches == [1]
    assert torch.isfinite(got).all()
    assert (got.float() - expected).abs().max().item() <= 2e-3 * expected.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pairs_rows_pad_an_odd_head_group(dtype: torch.dtype, pair_launches: list[int]) -> None:
    # three query heads a KV head (SmolLM2's shape): rows padded to 16, the spare ones unwritten
    q, k, v, meta = int8_batch([(13, 1), (40, 1)], heads=6, kv_heads=2, seed=4, dtype=dtype)
    baseline = paged_decode_attention(q, k, v, meta, SCALE, num_splits=2, int8_mode=INT8_CAST)
    got = paged_decode_attention(q, k, v, meta, SCALE, num_splits=2, int8_mode=INT8_PAIRS)
    assert pair_launches == [1]
    assert_near_the_reference(got, q, k, v, meta, baseline)


def test_mixed_batches_take_the_pairs_kernel_for_their_decode_rows(pair_launches: list[int],
                                                                    monkeypatch) -> None:
    monkeypatch.setattr(attention, "INT8_DECODE_MODES", (INT8_PAIRS, INT8_CAST))
    q, k, v, meta = int8_batch([(0, 17), (20, 1), (7, 9), (33, 1)], seed=7)
    baseline = paged_attention_ref(q.float(), k, v, meta, SCALE)
    got = paged_attention_triton(q, k, v, meta, SCALE)
    assert pair_launches == [1]
    assert (got.float() - baseline).abs().max().item() < 5e-3


def test_operands_the_pairs_kernel_cannot_take_go_to_the_split_k_kernel(pair_launches: list[int]) -> None:
    q, k, v, meta = int8_batch([(3, 1), (29, 1)], dtype=torch.float32)  # fp32 queries: no float16 dots
    assert not pairs_fit(q, k.codes)
    got = paged_decode_attention(q, k, v, meta, SCALE, num_splits=2, int8_mode=INT8_PAIRS)
    assert pair_launches == []
    torch.testing.assert_close(got, paged_attention_ref(q, k, v, meta, SCALE), atol=2e-5, rtol=2e-5)
    half = q.half()
    assert not pairs_fit(half, k.codes[..., 1:])  # odd offset: no int16 view
    assert not pairs_fit(half[..., :16].to("meta"), k.codes[..., :16])  # compiled, head_dim 16 < 32


def test_pairs_launch_fills_the_last_wave(monkeypatch) -> None:
    import kernels.attention.config as config

    monkeypatch.setattr(config, "num_sms", lambda device: 132)
    cuda = torch.device("cuda", 0)
    (long, three, _), (short, four, _) = config.INT8_PAIR_LAUNCHES
    assert (three, four) == (3, 4)
    # 8 KV heads at ctx 8k: B = 16 at 3 splits of 128-key tiles is 384 programs, one wave of three an SM
    # (396 slots); B = 32 at 3 splits two such waves, where 64-key tiles would fill one wave of four at 2
    # splits (the H100 sweep: 1.68x vs 1.49x); B = 64 unsplit 512 of 64 keys, one wave of four (528); B = 1
    # the most splits, two tiles each
    assert config.pairs_launch(16 * 8, 8192, cuda) == (3, long)
    assert config.pairs_launch(32 * 8, 8192, cuda) == (3, long)
    assert config.pairs_launch(64 * 8, 8192, cuda) == (1, short)
    assert config.pairs_launch(64 * 8, 8192, cuda, 2) == (2, long)  # asked to split: the 128-key tiles
    assert config.pairs_launch(8, 8192, cuda) == (32, long)
    assert config.pairs_launch(16 * 8, 8192, cuda, 5) == (5, long)  # asked splits: tiles by their fill
    splits, (block_n, _, stages) = config.pairs_launch(8, 512, cuda)
    assert block_n * splits >= 512 and stages <= -(-512 // (block_n * splits)) + 1
