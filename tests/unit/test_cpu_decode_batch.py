"""Flat CPU decode of several sequences equals the plain forward; the executor routes decode batches to it."""
from __future__ import annotations

import pytest
import torch

from contracts.kv_cache_spec import KVCacheSpec
from contracts.sampling import SamplingParams
from engine.config import EngineConfig
from engine.cpu_decode import FlatDecoder
from engine.executors.cpu_flat import MAX_FLAT_BATCH, CpuFlatExecutor
from engine.executors.factory import build_executor
from engine.kv_cache import KVCache
from engine.scheduler import ScheduledChunk, SchedulerOutput
from engine.sequence import Sequence
from tests.quantized_rows import assert_same_kv, cache_like
from tests.unit.test_cpu_decode_path import forward_step, tiny_blocked_model

pytestmark = pytest.mark.timeout(60)

# Three sequences of different lengths (block size 4): A over consecutive blocks, B sharing A's first block
# (a prefix cache hit) and then scattered ones (gathered), C over consecutive blocks not starting at 0.
PROMPTS = ([3, 17, 5, 40, 22, 9], [3, 17, 5, 40, 8, 31, 2], [12, 44])
BLOCKS = ([0, 1, 2], [0, 6, 4], [9, 10, 11])


def prefilled(model, kv: KVCache) -> None:
    forward_step(model, kv, PROMPTS[0], 0, BLOCKS[0])
    forward_step(model, kv, PROMPTS[1][4:], 4, BLOCKS[1])  # block 0 is A's: only the suffix is computed
    forward_step(model, kv, PROMPTS[2], 0, BLOCKS[2])


@pytest.mark.parametrize(("weights", "kv_dtype"), [
    ("fp32", "float32"), ("w4a16", "float32"), ("w8a8", "float32"), ("fp32", "int4"), ("w4a16", "int8")])
def test_flat_batch_decode_equals_plain_forward_per_sequence_and_stores_the_same_kv(weights: str,
                                                                                   kv_dtype: str) -> None:
    model = tiny_blocked_model(weights=weights)
    c = model.config
    plain_kv, flat_kv = cache_like(c, 12, kv_dtype), cache_like(c, 12, kv_dtype)
    tolerance = 1e-5 if kv_dtype == "float32" else 1e-4
    with torch.inference_mode():
        for kv in (plain_kv, flat_kv):
            prefilled(model, kv)
        decoder = FlatDecoder(model, flat_kv)
        positions = [len(p) for p in PROMPTS]
        for step, tokens in enumerate(([11, 30, 7], [1, 2, 46], [20, 5, 9])):  # each crosses a block edge
            expected = torch.cat([forward_step(model, plain_kv, [t], p, b)
                                  for t, p, b in zip(tokens, positions, BLOCKS, strict=True)])
            got = decoder.decode(tokens, positions, BLOCKS)
            torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance, msg=f"step {step}")
            positions = [p + 1 for p in positions]
    assert_same_kv(plain_kv, flat_kv)


def decode_step(seqs: list[Sequence]) -> SchedulerOutput:
    return SchedulerOutput(tuple(ScheduledChunk(s, s.num_tokens - 1, 1, 1) for s in seqs), ())


def test_executor_runs_decode_batches_flat_with_the_eager_greedy_tokens() -> None:
    model = tiny_blocked_model()
    c = model.config
    flat_kv = KVCache(KVCacheSpec(4, c.num_kv_heads, c.head_dim), c.num_layers, 12)
    eager_kv = KVCache(KVCacheSpec(4, c.num_kv_heads, c.head_dim), c.num_layers, 12)
    flat = build_executor(model, flat_kv, EngineConfig(), max_model_len=64)
    eager = build_executor(model, eager_kv, EngineConfig(), max_model_len=64).eager
    assert isinstance(flat, CpuFlatExecutor)

    def sequences() -> list[Sequence]:
        seqs = [Sequence(f"r{i}", [*p, 1], SamplingParams(temperature=0.0), block_table=list(b))
                for i, (p, b) in enumerate(zip(PROMPTS, BLOCKS, strict=True))]
        for seq in seqs:
            seq.num_computed_tokens = seq.num_tokens - 1
        return seqs

    flat_seqs, eager_seqs = sequences(), sequences()
    with torch.inference_mode():
        for kv in (flat_kv, eager_kv):
            prefilled(model, kv)
        assert flat._decode_batch(decode_step(flat_seqs), None) is not None
        for _ in range(3):
            got, expected = flat.launch(decode_step(flat_seqs)), eager.launch(decode_step(eager_seqs))
            assert got.token_ids.tolist() == expected.token_ids.tolist()
            torch.testing.assert_close(got.last_hidden, expected.last_hidden, atol=1e-5, rtol=1e-5)
            for seqs, step in ((flat_seqs, got), (eager_seqs, expected)):
                for seq, token in zip(seqs, step.token_ids.tolist(), strict=True):
                    seq.token_ids.append(token)
                    seq.num_computed_tokens += 1


def test_executor_leaves_mixed_hooked_capturing_and_oversized_batches_to_eager() -> None:
    model = tiny_blocked_model()
    c = model.config
    kv = KVCache(KVCacheSpec(4, c.num_kv_heads, c.head_dim), c.num_layers, 12)
    executor = build_executor(model, kv, EngineConfig(), max_model_len=64)
    seqs = [Sequence(f"r{i}", [1, 2, 3, 4, 5], SamplingParams(), block_table=[i, i + 2]) for i in range(2)]
    for seq in seqs:
        seq.num_computed_tokens = 4
    assert executor._decode_batch(decode_step(seqs), None) is not None
    assert executor._decode_batch(decode_step(seqs), layer_hook=lambda layer: None) is None
    assert executor._decode_batch(decode_step(seqs[:1]), None) is None  # bs1: FlatDecoder via _flat_chunk
    prefill = SchedulerOutput((*decode_step(seqs[1:]).chunks, ScheduledChunk(seqs[0], 0, 4, 0)), ())
    assert executor._decode_batch(prefill, None) is None
    seqs[1].block_table = [1]  # short: position 4 has no block
    assert executor._decode_batch(decode_step(seqs), None) is None
    seqs[1].block_table = [1, 3]
    many = [Sequence(f"m{i}", [1, 2], SamplingParams(), block_table=[i]) for i in range(MAX_FLAT_BATCH + 1)]
    for seq in many:
        seq.num_computed_tokens = 1
    assert executor._decode_batch(decode_step(many[:MAX_FLAT_BATCH]), None) is not None
    assert executor._decode_batch(decode_step(many), None) is None
    executor.feed(lambda layer, s: None)  # a draft head capturing features: FlatRows or the eager forward
    assert executor._decode_batch(decode_step(seqs), None) is None


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("weights", ["auto", "w4a16"])
def test_embedded_model_batch_greedy_tokens_are_the_same_flat_or_plain(weights: str) -> None:
    from engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(weights=weights, num_kv_blocks=32, max_num_seqs=4))
    assert isinstance(engine.executor, CpuFlatExecutor)
    prompts = [[6403, 1980, 253, 655, 28, 281, 253, 1165, 6560, 418, 260, 5595], [6403, 1980, 253, 655],
               [28, 281, 253, 1165, 6560, 418, 260, 5595, 6403], [655, 28]]
    sampling = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    flat = engine.generate(prompts, sampling)
    engine.executor = engine.executor.eager
    plain = engine.generate(prompts, sampling)
    assert flat == plain and all(len(tokens) == 16 for tokens in flat)
