"""Split-fused steps run flat on CPU with the eager step's tokens, hidden states and KV."""
from __future__ import annotations

import pytest
import torch

from contracts.sampling import SamplingParams
from engine.config import EngineConfig
from engine.executors.cpu_flat import MAX_FLAT_BATCH, CpuFlatExecutor
from engine.executors.factory import build_executor
from engine.kv_cache import KVCache
from engine.scheduler import ScheduledChunk, SchedulerOutput
from engine.sequence import Sequence
from tests.quantized_rows import assert_same_kv, cache_like
from tests.unit.test_cpu_decode_batch import BLOCKS, PROMPTS, prefilled
from tests.unit.test_cpu_decode_path import tiny_blocked_model

pytestmark = pytest.mark.timeout(60)

# A 9-token prompt over blocks 3, 7, 8 (scattered: gathered), prefilled in chunks of 4, 3 and 2 beside the
# decodes of PROMPTS' A and C; its last chunk samples its first token.
PROMPT = [5, 19, 33, 2, 41, 7, 26, 13, 30]
PROMPT_BLOCKS = [3, 7, 8]
CHUNKS = ((0, 4), (4, 3), (7, 2))


def executors(weights: str, kv_dtype: str = "float32") -> tuple[CpuFlatExecutor, CpuFlatExecutor, KVCache,
                                                                KVCache]:
    model = tiny_blocked_model(weights=weights)
    kvs = [cache_like(model.config, 12, kv_dtype) for _ in range(2)]
    flat, eager = (build_executor(model, kv, EngineConfig(), max_model_len=64) for kv in kvs)
    assert isinstance(flat, CpuFlatExecutor) and isinstance(eager, CpuFlatExecutor)
    with torch.inference_mode():
        for kv in kvs:
            prefilled(model, kv)
    eager.fused = None  # split-fused steps through the eager forward
    return flat, eager, kvs[0], kvs[1]


def sequences() -> tuple[list[Sequence], Sequence]:
    greedy = SamplingParams(temperature=0.0)
    decodes = [Sequence(f"r{i}", [*PROMPTS[i], 1], greedy, block_table=list(BLOCKS[i])) for i in (0, 2)]
    for seq in decodes:
        seq.num_computed_tokens = seq.num_tokens - 1
    prompt = Sequence("p", list(PROMPT), SamplingParams(temperature=0.0), block_table=list(PROMPT_BLOCKS))
    return decodes, prompt


def fused_step(decodes: list[Sequence], prompt: Sequence, start: int, n: int) -> SchedulerOutput:
    last = start + n == len(PROMPT)
    chunks = (ScheduledChunk(decodes[0], decodes[0].num_tokens - 1, 1, 1),
              ScheduledChunk(prompt, start, n, int(last)),
              ScheduledChunk(decodes[1], decodes[1].num_tokens - 1, 1, 1))
    return SchedulerOutput(chunks, ())


@pytest.mark.parametrize(("weights", "kv_dtype"), [
    ("fp32", "float32"), ("w4a16", "float32"), ("w8a8", "float32"), ("fp32", "int4"), ("w4a16", "int8")])
def test_fused_step_runs_flat_with_the_eager_steps_tokens_hidden_and_kv(weights: str, kv_dtype: str) -> None:
    flat, eager, flat_kv, eager_kv = executors(weights, kv_dtype)
    tolerance = 1e-5 if kv_dtype == "float32" else 1e-4
    runs = {"flat": (flat, *sequences()), "eager": (eager, *sequences())}
    with torch.inference_mode():
        for start, n in CHUNKS:
            steps = {}
            for name, (executor, decodes, prompt) in runs.items():
                batch = fused_step(decodes, prompt, start, n)
                runs_flat = executor.fused is not None and executor.fused.plan(batch) is not None
                assert runs_flat == (name == "flat")
                steps[name] = step = executor.launch(batch)
                for seq in decodes:
                    seq.num_computed_tokens += 1
                prompt.num_computed_tokens += n
                for seq, token in zip(step.seqs, step.token_ids.tolist(), strict=True):
                    seq.token_ids.append(token)
            got, expected = steps["flat"], steps["eager"]
            assert [s.request_id for s in got.seqs] == [s.request_id for s in expected.seqs]
            assert got.token_ids.tolist() == expected.token_ids.tolist()
            torch.testing.assert_close(got.last_hidden, expected.last_hidden, atol=tolerance, rtol=tolerance)
    assert [s.request_id for s in got.seqs] == ["r0", "p", "r2"]  # the last chunk sampled the prompt's token
    assert_same_kv(flat_kv, eager_kv, atol=1e-5)


def test_fused_plan_takes_only_decodes_beside_prompt_chunks() -> None:
    flat, _, _, _ = executors("fp32")
    decodes, prompt = sequences()
    fused = flat.fused
    assert fused.plan(fused_step(decodes, prompt, 0, 4)) is not None
    only_decodes = SchedulerOutput(tuple(ScheduledChunk(s, s.num_tokens - 1, 1, 1) for s in decodes), ())
    assert fused.plan(only_decodes) is None  # decode-only: FlatDecoder.decode
    assert fused.plan(SchedulerOutput((ScheduledChunk(prompt, 0, 4, 0),), ())) is None  # prefill only: eager
    verify = SchedulerOutput((ScheduledChunk(decodes[0], decodes[0].num_tokens - 1, 2, 2, (3,)),
                              ScheduledChunk(prompt, 0, 4, 0)), ())
    assert fused.plan(verify) is None
    prompt.block_table = [3]  # short: positions 4.. have no block
    assert fused.plan(fused_step(decodes, prompt, 4, 3)) is None
    prompt.block_table = list(PROMPT_BLOCKS)
    many = [Sequence(f"m{i}", [1, 2], SamplingParams(), block_table=[i % 12])
            for i in range(MAX_FLAT_BATCH + 1)]
    for seq in many:
        seq.num_computed_tokens = 1
    chunks = [ScheduledChunk(s, 1, 1, 1) for s in many]
    prefill = ScheduledChunk(prompt, 0, 4, 0)
    assert fused.plan(SchedulerOutput((*chunks[:MAX_FLAT_BATCH], prefill), ())) is not None
    assert fused.plan(SchedulerOutput((*chunks, prefill), ())) is None


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_embedded_model_greedy_tokens_are_the_same_with_fused_steps_flat_or_eager() -> None:
    """An 8-token budget: each prompt after the first prefills in chunks beside the earlier ones' decodes."""
    from engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(num_kv_blocks=32, max_num_seqs=4, max_batch_tokens=8,
                                    fused_step_max_slowdown=0))
    fused, calls = engine.executor.fused, []
    launch = fused.launch
    fused.launch = lambda batch, plan: calls.append(len(batch.chunks)) or launch(batch, plan)
    prompts = [[6403, 1980, 253, 655], [28, 281, 253, 1165, 6560, 418, 260, 5595, 6403, 1980, 253],
               [655, 28, 281, 253, 1165, 6560, 418, 260, 5595], [1165, 6560, 418, 260, 5595, 6403, 28]]
    sampling = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    flat = engine.generate(prompts, sampling)
    assert calls  # some steps were split-fused and ran flat
    engine.executor.fused = None
    eager = engine.generate(prompts, sampling)
    assert flat == eager and all(len(tokens) == 16 for tokens in flat)
