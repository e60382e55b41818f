"""Paged KV cache: wire-format shapes, metadata from scheduled chunks, chunked runs equal one full pass."""
from __future__ import annotations

import random

import pytest
import torch

from contracts.kv_cache_spec import KVCacheSpec, KVScales, ScaleKind, scales_for
from contracts.sampling import SamplingParams
from engine.config import EngineConfig, ModelConfig
from engine.executors.batch_inputs import prepare_inputs
from engine.executors.eager import EagerExecutor
from engine.kv_cache import KVCache
from engine.model import LlamaModel
from engine.scheduler import ScheduledChunk, SchedulerOutput
from engine.sequence import Sequence
from kernels.attention.metadata import AttentionMetadata, BlockTableError

pytestmark = pytest.mark.timeout(60)

TINY = ModelConfig(name="tiny", vocab_size=96, hidden_size=48, intermediate_size=80, num_layers=3,
                   num_heads=6, num_kv_heads=2, head_dim=8, max_position_embeddings=256,
                   rope_theta=10000.0, tie_word_embeddings=True, eos_token_ids=(0,))
BLOCK = 4


@pytest.fixture(scope="module")
def tiny_model() -> LlamaModel:
    torch.manual_seed(0)
    model = LlamaModel(TINY).eval()
    with torch.no_grad():  # non-trivial norm weights so a wrong residual/norm order shows up
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.uniform_(0.5, 1.5)
    return model


def tiny_cache(num_blocks: int = 32) -> KVCache:
    return KVCache(KVCacheSpec(BLOCK, TINY.num_kv_heads, TINY.head_dim), TINY.num_layers, num_blocks)


def test_cache_tensors_are_per_layer_block_pools_in_wire_format() -> None:
    spec = KVCacheSpec(block_size=16, num_kv_heads=2, head_dim=8, dtype="bfloat16")
    kv = KVCache(spec, num_layers=3, num_blocks=10)
    assert len(kv.k) == len(kv.v) == 3
    for t in kv.k + kv.v:
        assert t.shape == (10, 16, 2, 8) and t.dtype == torch.bfloat16 and t.is_contiguous()
        assert not t.any()
    assert kv.bytes_per_block == 2 * 3 * 16 * 2 * 8 * 2
    assert kv.k[1][[4, 2]].shape == (2, 16, 2, 8)  # what kv_transfer gathers per layer
    with pytest.raises(ValueError, match="num_blocks"):
        KVCache(KVCacheSpec(block_size=16, num_kv_heads=1, head_dim=8), num_layers=1, num_blocks=0)
    assert kv.scales == {}  # float caches have no scale tensors


def test_quantized_spec_allocates_its_scale_tensors_per_layer() -> None:
    spec = KVCacheSpec(4, 2, 8, "int4", scales=KVScales(ScaleKind.GROUPED, group_size=4, zero_points=True))
    kv = KVCache(spec, num_layers=2, num_blocks=5)
    assert kv.k[0].shape == (5, 4, 2, 4) and kv.k[0].dtype == torch.uint8  # two int4 values a byte
    assert {name: (len(ts), ts[0].shape) for name, ts in kv.scales.items()} == {
        "k_scale": (2, (5, 4, 2, 2)), "v_scale": (2, (5, 4, 2, 2)),
        "k_zero": (2, (5, 4, 2, 2)), "v_zero": (2, (5, 4, 2, 2)),
    }
    assert kv.bytes_per_block == 2 * spec.bytes_per_block
    k, v = kv.layer(1)  # what the kernels take: the stored codes with their scales and zeros
    assert k.codes is kv.k[1] and k.scale is kv.scales["k_scale"][1] and v.zero is kv.scales["v_zero"][1]
    assert (k.bits, k.group_size, k.shape) == (4, 4, (5, 4, 2, 8))
    names = ("k_scale", "v_scale", "k_zero", "v_zero")
    assert all(t is kv.scales[n][1] for t, n in zip(kv.layer_scales(1), names, strict=True))


def test_engine_config_picks_the_cache_dtype_and_rejects_others() -> None:
    auto = KVCache.for_model(TINY, EngineConfig(dtype="bfloat16", num_kv_blocks=3, block_size=BLOCK))
    assert auto.spec == KVCacheSpec(BLOCK, TINY.num_kv_heads, TINY.head_dim, "bfloat16")
    assert auto.k[0].dtype == torch.bfloat16 and len(auto.k) == TINY.num_layers
    wide = KVCache.for_model(TINY, EngineConfig(dtype="bfloat16", kv_cache_dtype="float32", num_kv_blocks=3))
    assert wide.spec.dtype == "float32" and wide.v[0].dtype == torch.float32
    int8 = KVCache.for_model(TINY, EngineConfig(kv_cache_dtype="int8", num_kv_blocks=3, block_size=BLOCK))
    assert int8.spec.scales == scales_for("int8", TINY.head_dim) and int8.k[0].dtype == torch.int8
    assert int8.layer(0)[0].scale.shape == (3, BLOCK, TINY.num_kv_heads)
    with pytest.raises(ValueError, match=r"kv_cache_dtype 'int2' is not supported; expected one of auto, "
                                         r"float32, float16, bfloat16, int8, int4"):
        EngineConfig(kv_cache_dtype="int2")


def seq(request_id: str, tokens: list[int], blocks: list[int], max_tokens: int = 4) -> Sequence:
    return Sequence(request_id, list(tokens), SamplingParams(max_tokens=max_tokens), block_table=list(blocks))


def test_metadata_maps_each_new_token_to_its_block_slot() -> None:
    a = seq("a", list(range(10)), [7, 2, 9])  # 10 tokens, block size 4: blocks 7, 2, 9
    b = seq("b", list(range(3)), [4])
    meta = AttentionMetadata.from_chunks(
        [ScheduledChunk(a, 3, 6, 0), ScheduledChunk(b, 0, 3, 1)], BLOCK)
    # a: positions 3..8 → (7,3) (2,0..3) (9,0); b: positions 0..2 → (4,0..2)
    assert meta.slot_mapping.tolist() == [31, 8, 9, 10, 11, 36, 16, 17, 18]
    assert meta.query_start_loc.tolist() == [0, 6, 9]
    assert meta.seq_lens.tolist() == [9, 3]
    assert meta.block_tables.tolist() == [[7, 2, 9], [4, 0, 0]]
    assert (meta.max_query_len, meta.max_seq_len, meta.num_tokens) == (6, 9, 9)
    assert meta.spans[0].first_slot is None  # 7, 2, 9 are not consecutive → gather
    assert meta.spans[1].first_slot == 16  # a single block is one contiguous slice


def test_metadata_rejects_block_table_shorter_than_scheduled_tokens() -> None:
    short = seq("s", list(range(9)), [0, 1])
    with pytest.raises(BlockTableError, match="2 blocks cannot hold 9 tokens"):
        AttentionMetadata.from_chunks([ScheduledChunk(short, 0, 9, 1)], BLOCK)


def full_hidden(model: LlamaModel, tokens: list[int]) -> torch.Tensor:
    """Every position's final hidden state from one pass over the whole sequence (its own fresh cache)."""
    kv = tiny_cache()
    s = seq("full", tokens, list(range(-(-len(tokens) // BLOCK))))
    ids, pos, meta = prepare_inputs([ScheduledChunk(s, 0, len(tokens), 1)], BLOCK, torch.device("cpu"))
    with torch.inference_mode():
        return model(ids, pos, meta, kv)


def test_chunked_prefill_then_decode_over_scattered_blocks_equals_one_full_pass(
    tiny_model: LlamaModel,
) -> None:
    rng = random.Random(0)
    prompts = {"a": [rng.randrange(TINY.vocab_size) for _ in range(13)],
               "b": [rng.randrange(TINY.vocab_size) for _ in range(6)]}
    pool = list(range(32))
    rng.shuffle(pool)
    seqs = {rid: seq(rid, toks, [pool.pop() for _ in range(6)], max_tokens=8)
            for rid, toks in prompts.items()}
    runner = EagerExecutor(tiny_model, tiny_cache(), torch.device("cpu"))
    a, b = seqs["a"], seqs["b"]
    # Step 1: a's first 5 tokens + all of b (b samples). Step 2: b decodes + the rest of a (samples).
    # Then 3 decode steps of both.
    steps = [[(a, 5, False), (b, 6, True)], [(b, 1, True), (a, 8, True)]] + [[(a, 1, True), (b, 1, True)]] * 3
    hidden: dict[str, dict[int, torch.Tensor]] = {"a": {}, "b": {}}  # position → last_hidden
    for step in steps:
        chunks = [ScheduledChunk(s, s.num_computed_tokens, n, int(sample)) for s, n, sample in step]
        out = runner.execute(SchedulerOutput(tuple(chunks), ()))
        assert set(out.sampled) == {c.seq.request_id for c in chunks if c.num_sampled}
        for c in chunks:  # what the scheduler's postprocess would do
            c.seq.num_computed_tokens = c.start + c.num_new_tokens
            if c.num_sampled:
                c.seq.token_ids.extend(out.sampled[c.seq.request_id])
                hidden[c.seq.request_id][c.start + c.num_new_tokens - 1] = out.last_hidden[c.seq.request_id]
    for s in (a, b):
        assert len(s.output_token_ids) == len(hidden[s.request_id]) >= 4
        ref = full_hidden(tiny_model, s.token_ids)
        for position, h in hidden[s.request_id].items():
            torch.testing.assert_close(h, ref[position], atol=1e-5, rtol=1e-5)
        # Greedy: every generated token is the argmax of the one-pass logits at the previous position.
        with torch.inference_mode():
            logits = tiny_model.compute_logits(ref)
        assert s.output_token_ids == logits[s.num_prompt_tokens - 1:-1].argmax(-1).tolist()


def test_layer_hook_runs_once_per_layer_after_that_layers_kv_is_stored(tiny_model: LlamaModel) -> None:
    kv = tiny_cache()
    s = seq("h", [5, 6, 7, 8, 9], [3, 4])
    seen: list[tuple[int, bool, bool]] = []

    def hook(layer: int) -> None:
        nxt = kv.k[layer + 1][3] if layer + 1 < TINY.num_layers else None
        seen.append((layer, bool(kv.k[layer][3].any() and kv.v[layer][4, 0].any()),
                     nxt is None or not nxt.any()))

    step = SchedulerOutput((ScheduledChunk(s, 0, 5, 1),), ())
    EagerExecutor(tiny_model, kv, torch.device("cpu")).execute(step, layer_hook=hook)
    assert seen == [(i, True, True) for i in range(TINY.num_layers)]


def test_runner_returns_nothing_for_an_empty_step_or_non_sampling_chunks(tiny_model: LlamaModel) -> None:
    runner = EagerExecutor(tiny_model, tiny_cache(), torch.device("cpu"))
    assert runner.execute(SchedulerOutput((), ())).sampled == {}
    out = runner.execute(SchedulerOutput((ScheduledChunk(seq("p", [1, 2, 3, 4, 5], [0, 1]), 0, 3, 0),), ()))
    assert out.sampled == {} and out.last_hidden == {}
