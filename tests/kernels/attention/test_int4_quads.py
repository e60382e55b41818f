"""The int4 quad decode kernel (kernels/attention/int4_decode.py; interpreted on CPU, its PTX swapped for the
same bit operations) equals the reference over the same int4 blocks, within the dequantizing kernel's
rounding; operands it cannot take go to the dequantizing kernel."""
from __future__ import annotations

import pytest
import torch

import kernels.attention.kernel as attention
from kernels.attention.config import INT4_QUADS
from kernels.attention.int4_decode import quads_fit, rows_per_kv_head
from kernels.attention.kernel import paged_attention_triton, paged_decode_attention
from kernels.attention.reference import paged_attention_ref
from tests.kernels.attention.test_quantized_attention import HEAD_DIM, quantized
from tests.kernels.attention.test_triton_attention import make_batch

pytestmark = pytest.mark.timeout(300)
SCALE = HEAD_DIM ** -0.5


@pytest.fixture
def quad_launches(monkeypatch) -> list[int]:
    """Counts the quad kernel's launches through kernel._launch_decode."""
    calls: list[int] = []
    launch = attention.launch_int4_quads

    def counted(*args, **kwargs):
        calls.append(1)
        return launch(*args, **kwargs)

    monkeypatch.setattr(attention, "launch_int4_quads", counted)
    return calls


def int4_batch(seqs, key_group: int, value_group: int, heads: int = 4, kv_heads: int = 2, seed: int = 0,
               dtype: torch.dtype = torch.float16):
    q, k_cache, v_cache, meta = make_batch(seqs, heads, kv_heads, HEAD_DIM, 4, True, seed)
    k, v = quantized(k_cache, "int4", key_group), quantized(v_cache, "int4", value_group)
    return q.to(dtype), k, v, meta


def assert_near_the_reference(got: torch.Tensor, q, k, v, meta, baseline: torch.Tensor) -> None:
    """got within twice the dequantizing kernel's own distance from the fp32 reference (both round the query
    and one dot operand to 16 bits), plus a little."""
    expected = paged_attention_ref(q.float(), k, v, meta, SCALE)
    bound = 2 * (baseline.float() - expected).abs().max().item() + 1e-3
    assert (got.float() - expected).abs().max().item() <= bound


@pytest.mark.parametrize("splits", [3, 9])  # 9 > the in-place merge's limit: the reduce kernel merges
@pytest.mark.parametrize("key_group, value_group", [(16, 32), (8, 16), (32, 8)])
def test_quad_decode_matches_the_reference(key_group: int, value_group: int, splits: int,
                                           quad_launches: list[int]) -> None:
    # several groups a row or one, a ragged tail, an empty sequence, a context split nine ways
    q, k, v, meta = int4_batch([(3, 1), (29, 1), (0, 1), (71, 1)], key_group, value_group, seed=splits)
    assert quads_fit(q, k.codes, key_group, value_group)
    baseline = paged_decode_attention(q, k, v, meta, SCALE, num_splits=splits, int4_dequant=1)
    got = paged_decode_attention(q, k, v, meta, SCALE, num_splits=splits, int4_dequant=INT4_QUADS)
    assert quad_launches == [1]
    assert_near_the_reference(got, q, k, v, meta, baseline)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quad_rows_pad_an_odd_head_group(dtype: torch.dtype, quad_launches: list[int]) -> None:
    # three query heads a KV head (SmolLM2's shape): rows padded to a power of two, the spare ones unwritten
    assert rows_per_kv_head(3, HEAD_DIM, 16, 32) == 16  # one value group: 16 rows for the value product
    q, k, v, meta = int4_batch([(13, 1), (40, 1)], 16, 32, heads=6, kv_heads=2, seed=4, dtype=dtype)
    baseline = paged_decode_attention(q, k, v, meta, SCALE, num_splits=2, int4_dequant=1)
    got = paged_decode_attention(q, k, v, meta, SCALE, num_splits=2, int4_dequant=INT4_QUADS)
    assert quad_launches == [1]
    if dtype == torch.float16:  # this Triton's interpreter gets bf16 dots wrong (bench/kernels/quant_common)
        assert_near_the_reference(got, q, k, v, meta, baseline)


def test_mixed_batches_take_the_quad_kernel_for_their_decode_rows(quad_launches: list[int],
                                                                   monkeypatch) -> None:
    monkeypatch.setattr(attention, "INT4_DEQUANT_MODES", (INT4_QUADS, 1, 0))  # the launch's mode: quads
    q, k, v, meta = int4_batch([(0, 17), (20, 1), (7, 9), (33, 1)], 16, 32, seed=7)
    baseline = paged_attention_ref(q.float(), k, v, meta, SCALE)
    got = paged_attention_triton(q, k, v, meta, SCALE)
    assert quad_launches == [1]
    assert (got.float() - baseline).abs().max().item() < 5e-3


def test_operands_the_quad_kernel_cannot_take_go_to_the_dequantizing_kernel(quad_launches: list[int]) -> None:
    q, k, v, meta = int4_batch([(3, 1), (29, 1)], 16, 32, dtype=torch.float32)  # fp32 queries: no BASE trick
    assert not quads_fit(q, k.codes, 16, 32)
    got = paged_decode_attention(q, k, v, meta, SCALE, num_splits=2, int4_dequant=INT4_QUADS)
    assert quad_launches == []
    torch.testing.assert_close(got, paged_attention_ref(q, k, v, meta, SCALE), atol=2e-5, rtol=2e-5)
    half = q.half()
    assert not quads_fit(half, k.codes, 6, 32)  # groups that split a quad
    assert not quads_fit(half.to("meta"), k.codes, 16, 32)  # compiled (not the interpreter): head_dim 32 < 64


def test_splits_and_register_cap_follow_the_last_waves_fill(monkeypatch) -> None:
    import kernels.attention.config as config

    monkeypatch.setattr(config, "num_sms", lambda device: 132)
    cuda = torch.device("cuda", 0)  # only its type is read once num_sms is fixed
    (uncapped, two, no_cap), (capped, three, cap) = config.INT4_QUAD_LAUNCHES
    assert (two, no_cap, three) == (2, 0, 3) and cap > 0
    # 8 KV heads at ctx 8k (64 tiles of 128 keys): B=16 at 3 splits (384 programs) fills one wave of three
    # an SM (capped); B=64 at 1 split (512) two waves of two (uncapped)
    assert config.quad_launch(16 * 8, 8192, cuda, 3)[1:] == (capped, cap)
    assert config.quad_launch(64 * 8, 8192, cuda, 1)[1:] == (uncapped, 0)
    # left to choose: the fewest splits of near-best efficiency (the H100 sweep's best at B = 8-64)
    chosen = {b: config.quad_launch(b * 8, 8192, cuda) for b in (8, 12, 16, 32, 64)}
    assert {b: (splits, c) for b, (splits, _, c) in chosen.items()} == {
        8: (4, 0), 12: (4, cap), 16: (2, 0), 32: (1, 0), 64: (1, 0)}
    assert config.choose_num_splits(16, 8, 8192, cuda, kv_bits=4, quads=True) == 2
    # whole tiles a split: B = 1 takes 32 splits of two tiles (31 would leave one nearly empty), and no
    # deeper a pipeline than that: 3 stages
    assert config.quad_launch(8, 8192, cuda) == (32, uncapped[:2] + (3,), 0)
    assert config.quad_launch(8, 512, cuda)[0] == 4  # a 512-token context: at most four 128-key tiles
