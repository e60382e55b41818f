"""CPU decode fast paths equal the plain math: fused rotary, attention, RMSNorm, the flat decoder."""
from __future__ import annotations

import pytest
import torch

from contracts.kv_cache_spec import KVCacheSpec, scales_for
from contracts.sampling import SamplingParams
from engine.config import EngineConfig, ModelConfig
from engine.cpu_decode import FlatDecoder
from engine.cpu_linear import use_cpu_linears
from engine.executors.cpu_flat import CpuFlatExecutor
from engine.executors.factory import build_executor
from engine.kv_cache import KVCache
from engine.model import LlamaModel
from engine.quantize import use_int4, use_w8a8
from engine.scheduler import ScheduledChunk, SchedulerOutput
from engine.sequence import Sequence
from kernels.attention.metadata import AttentionMetadata, SeqSpan
from kernels.attention.reference import paged_attention_ref
from kernels.rmsnorm.reference import rms_norm_ref
from kernels.rotary.reference import apply_rotary_ref
from tests.quantized_rows import assert_same_kv, cache_like
from tests.tiny_model import normal_model

pytestmark = pytest.mark.timeout(60)


def rotate_half_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's formula: x·[cos, cos] + rotate_half(x)·[sin, sin], tables [T, D/2] broadcast over heads."""
    x1, x2 = x.chunk(2, dim=-1)
    cos_full = torch.cat((cos, cos), dim=-1).unsqueeze(1)
    sin_full = torch.cat((sin, sin), dim=-1).unsqueeze(1)
    return x * cos_full + torch.cat((-x2, x1), dim=-1) * sin_full


@pytest.mark.parametrize("tokens", [1, 4])
def test_rotary_of_fused_qkv_views_matches_hf_rotate_half(tokens: int) -> None:
    gen = torch.Generator().manual_seed(tokens)
    num_heads, num_kv_heads, head_dim = 3, 1, 8
    fused = torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen)
    heads = fused.view(tokens, num_heads + 2 * num_kv_heads, head_dim)
    q, k, _ = heads.split_with_sizes([num_heads, num_kv_heads, num_kv_heads], dim=1)
    cos, sin = torch.randn(tokens, head_dim // 2, generator=gen), torch.randn(tokens, head_dim // 2,
                                                                            generator=gen)
    before = fused.clone()
    q_rot, k_rot = apply_rotary_ref(q, k, cos, sin)  # adjacent heads: rotated in one pass
    torch.testing.assert_close(q_rot, rotate_half_reference(q, cos, sin), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(k_rot, rotate_half_reference(k, cos, sin), atol=1e-6, rtol=1e-6)
    assert torch.equal(fused, before)  # inputs untouched
    # Separate (non-adjacent) tensors take the per-tensor path and agree.
    q_sep, k_sep = apply_rotary_ref(q.clone(), k.clone(), cos, sin)
    assert torch.equal(q_sep, q_rot) and torch.equal(k_sep, k_rot)


@pytest.mark.parametrize("contiguous_blocks", [True, False])
def test_decode_attention_matches_softmax_of_scaled_scores(contiguous_blocks: bool) -> None:
    gen = torch.Generator().manual_seed(int(contiguous_blocks))
    block_size, num_kv_heads, group, head_dim, seq_len = 4, 2, 3, 8, 10
    k_cache = torch.randn(6, block_size, num_kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(6, block_size, num_kv_heads, head_dim, generator=gen)
    blocks = (2, 3, 4) if contiguous_blocks else (5, 0, 3)
    span = SeqSpan(0, 1, seq_len, blocks, blocks[0] * block_size if contiguous_blocks else None)
    meta = AttentionMetadata.from_spans([span], [0], block_size)
    q = torch.randn(1, num_kv_heads * group, head_dim, generator=gen)
    out = paged_attention_ref(q, k_cache, v_cache, meta, 0.3)
    slots = [b * block_size + i for b in blocks for i in range(block_size)][:seq_len]
    k = k_cache.view(-1, num_kv_heads, head_dim)[slots].repeat_interleave(group, 1)  # [S, Hq, D]
    v = v_cache.view(-1, num_kv_heads, head_dim)[slots].repeat_interleave(group, 1)
    probs = (torch.einsum("hd,shd->hs", q[0], k) * 0.3).softmax(-1)
    torch.testing.assert_close(out[0], torch.einsum("hs,shd->hd", probs, v), atol=1e-5, rtol=1e-5)


def test_rms_norm_matches_hf_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    x, residual = torch.randn(3, 64, generator=gen), torch.randn(3, 64, generator=gen)
    weight = torch.randn(64, generator=gen)
    s = x + residual
    expected = weight * (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5))
    out, new_residual = rms_norm_ref(x, weight, 1e-5, residual)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(new_residual, s)


# ---- the flat bs1 decoder against the plain forward --------------------------------------------------------

def tiny_blocked_model(head_dim: int = 8, weights: str = "fp32") -> LlamaModel:
    """`weights` "w4a16" / "w8a8": projections quantized first, as LLMEngine does (then only the head is
    blocked)."""
    config = ModelConfig(name="t", vocab_size=48, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=head_dim, max_position_embeddings=512,
                         tie_word_embeddings=True)
    model = normal_model(config)
    if weights == "w4a16":
        use_int4(model, None)
    elif weights == "w8a8":
        use_w8a8(model, None)
    use_cpu_linears(model)
    return model


def forward_step(model: LlamaModel, kv: KVCache, tokens: list[int], start: int,
                 blocks: list[int]) -> torch.Tensor:
    """The plain forward over tokens at positions start.., stored in `blocks` (as many as they need)."""
    block = kv.block_size
    end = start + len(tokens)
    used = tuple(blocks[:-(-end // block)])
    consecutive = list(used) == list(range(used[0], used[0] + len(used)))
    span = SeqSpan(0, len(tokens), end, used, used[0] * block if consecutive else None)
    slots = [used[p // block] * block + p % block for p in range(start, end)]
    meta = AttentionMetadata.from_spans([span], slots, block)
    return model(torch.tensor(tokens), torch.arange(start, end), meta, kv)


@pytest.mark.parametrize(("head_dim", "weights", "blocks", "kv_dtype"), [
    (8, "fp32", [2, 3, 4], "float32"), (6, "fp32", [2, 3, 4], "float32"), (8, "fp32", [5, 0, 3], "float32"),
    (8, "w4a16", [2, 3, 4], "float32"), (8, "w8a8", [6, 1, 2], "float32"),
    (8, "fp32", [2, 3, 4], "int8"), (8, "fp32", [5, 0, 3], "int4"), (8, "w4a16", [6, 1, 2], "int4"),
    (8, "w8a8", [2, 3, 4], "int8")])
def test_flat_decoder_equals_plain_forward_and_stores_the_same_kv(head_dim: int, weights: str,
                                                                  blocks: list[int], kv_dtype: str) -> None:
    """Scales 1/sqrt(8) and 1/sqrt(6): neither a power of two. Quantized projections run as their modules;
    scattered blocks (a prefix cache hit, a wrapped free list) are gathered. int8 / int4 caches: stored by
    the same quantizing store (w4a16 at bs1: the C step's), read dequantized per sequence as the reference
    attention reads them."""
    model = tiny_blocked_model(head_dim, weights)
    c = model.config
    plain_kv, flat_kv = cache_like(c, 8, kv_dtype), cache_like(c, 8, kv_dtype)
    assert FlatDecoder.supports(model, flat_kv)
    prompt = [3, 17, 5, 40, 22, 9]
    tolerance = 1e-5 if kv_dtype == "float32" else 1e-4
    with torch.inference_mode():
        for kv in (plain_kv, flat_kv):
            forward_step(model, kv, prompt, 0, blocks)
        decoder = FlatDecoder(model, flat_kv)
        for position, token in enumerate([11, 30, 7, 1], start=len(prompt)):  # crosses a block boundary
            expected = forward_step(model, plain_kv, [token], position, blocks)
            got = decoder(token, position, blocks)
            torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)
    assert_same_kv(plain_kv, flat_kv)


def test_flat_decoder_needs_f32_linears_and_an_fp32_or_quantized_cache() -> None:
    config = ModelConfig(name="t", vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1,
                         num_heads=2, num_kv_heads=1, head_dim=8, max_position_embeddings=64)
    plain = LlamaModel(config)
    kv = KVCache(KVCacheSpec(4, 1, 8), 1, 4)
    assert not FlatDecoder.supports(plain, kv)
    with pytest.raises(ValueError):
        FlatDecoder(plain, kv)
    use_cpu_linears(plain)
    assert FlatDecoder.supports(plain, kv)
    assert not FlatDecoder.supports(plain, KVCache(KVCacheSpec(4, 1, 8, "bfloat16"), 1, 4))
    for dtype in ("int8", "int4"):  # stored and read as the reference does (or in place by the C step)
        quantized = KVCache(KVCacheSpec(4, 1, 8, dtype, scales_for(dtype, 8)), 1, 4)
        assert FlatDecoder.supports(plain, quantized)


def test_executor_decodes_bs1_flat_also_over_scattered_blocks_and_falls_back_for_hooks_and_verify() -> None:
    model = tiny_blocked_model()
    c = model.config
    kv = KVCache(KVCacheSpec(4, c.num_kv_heads, c.head_dim), c.num_layers, 8)
    executor = build_executor(model, kv, EngineConfig(), max_model_len=64)
    assert isinstance(executor, CpuFlatExecutor)
    seq = Sequence("r", [3, 17, 5, 40, 22, 9, 11], SamplingParams(), block_table=[2, 3])
    seq.num_computed_tokens = 6
    step = SchedulerOutput((ScheduledChunk(seq, 6, 1, 1),), ())
    with torch.inference_mode():
        assert executor.flat_hidden(step) is not None
        assert executor.flat_hidden(step, layer_hook=lambda layer: None) is None
        verify = SchedulerOutput((ScheduledChunk(seq, 6, 2, 2, (8,)),), ())
        assert executor.flat_hidden(verify) is None
        seq.block_table = [2, 5]  # position 6 lives in block 5: not consecutive with block 2 (gathered)
        assert executor.flat_hidden(step) is not None
        seq.block_table = [2]  # short: position 6 has no block
        assert executor.flat_hidden(step) is None
        prefill = SchedulerOutput((ScheduledChunk(seq, 0, 7, 1),), ())
        assert executor.flat_hidden(prefill) is None


@pytest.mark.slow
@pytest.mark.timeout(600)  # w8a8 calibrates its smoothing factors at load (minutes on a busy box)
@pytest.mark.parametrize(("weights", "kv_cache"), [("auto", "auto"), ("w4a16", "auto"), ("w8a8", "auto"),
                                                   ("w4a16", "int4")])
def test_embedded_model_bs1_greedy_tokens_are_the_same_flat_or_plain(weights: str, kv_cache: str) -> None:
    from engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(weights=weights, kv_cache_dtype=kv_cache, num_kv_blocks=16,
                                    max_num_seqs=1))
    assert isinstance(engine.executor, CpuFlatExecutor)  # CPU, fp32 activations: bs1 decode runs flat
    prompt = [6403, 1980, 253, 655, 28, 281, 253, 1165, 6560, 418, 260, 5595]
    sampling = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    flat = engine.generate([prompt], sampling)
    engine.executor = engine.executor.eager
    plain = engine.generate([prompt], sampling)
    assert flat == plain and len(flat[0]) == 24
