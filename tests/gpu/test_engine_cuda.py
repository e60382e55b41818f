"""The engine on CUDA: graphed decode equals eager decode token for token, never syncs, pads harmlessly."""
from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from contracts.sampling import SamplingParams
from engine.config import EngineConfig, ModelConfig
from engine.cuda_graphs import decode_buckets
from engine.executors.eager import EagerExecutor
from engine.executors.graphed import GraphedExecutor
from engine.executors.lookahead import DecodeLookahead
from engine.llm_engine import LLMEngine
from engine.model import LlamaModel
from engine.model_files import ModelPathError, embedded_model_path
from engine.random_models import build_random_model

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]

TINY = ModelConfig(name="tiny-cuda", vocab_size=1024, hidden_size=256, intermediate_size=512, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=1024)
# Lengths on, before and after 16-token block boundaries; different max_tokens shrink the batch mid-run,
# so rows shift and buckets change (5 → bucket 8, then 4, 2, 1).
PROMPT_LENGTHS = (3, 15, 16, 17, 40)
MAX_TOKENS = (24, 9, 17, 5, 12)


@pytest.fixture(autouse=True)
def compiled_kernels_only() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter mode is on in this process: run tests/gpu in its own pytest process")


def random_model(config: ModelConfig, dtype: torch.dtype, std: float = 0.1, seed: int = 0) -> LlamaModel:
    """Random weights drawn on the GPU; std 0.1 keeps greedy choices far from ties."""
    return build_random_model(config, dtype, "cuda", seed=seed, std=std)


def tiny_engine(model: LlamaModel | None = None, **config) -> LLMEngine:
    """The tiny engine; `model`: share another engine's weights (each engine has its own KV cache)."""
    engine_config = EngineConfig(device="cuda", dtype="float32", num_kv_blocks=64, max_num_seqs=8,
                                 max_batch_tokens=128, **config)
    return LLMEngine(engine_config, model=(TINY, model or random_model(TINY, torch.float32)))


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return tiny_engine()


@pytest.fixture(scope="module")
def eager_engine(engine: LLMEngine) -> LLMEngine:
    return tiny_engine(engine.model, cuda_graphs=False)


def twin(engine: LLMEngine, **config) -> LLMEngine:
    """Another engine over the same model with some config fields changed."""
    return LLMEngine(replace(engine.config, **config), model=(engine.model_config, engine.model))


def is_graphed(engine: LLMEngine, batch) -> bool:
    executor = engine.executor
    return isinstance(executor, (GraphedExecutor, DecodeLookahead)) and executor.graphed(batch)


def prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(1, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def generate(engine: LLMEngine, prompt_ids: list[list[int]],
             max_tokens: tuple[int, ...]) -> tuple[list[list[int]], int, int]:
    """Greedy outputs per prompt, and how many steps replayed a graph out of all steps."""
    seqs = [engine.add_request(f"gen-{i}", p, SamplingParams(max_tokens=m, ignore_eos=True))
            for i, (p, m) in enumerate(zip(prompt_ids, max_tokens, strict=True))]
    graphed = steps = 0
    while engine.has_work():
        batch = engine.schedule()
        graphed += is_graphed(engine, batch)
        steps += 1
        engine.postprocess(batch, engine.execute(batch))
    return [s.output_token_ids for s in seqs], graphed, steps


def into_decode(engine: LLMEngine, lengths: tuple[int, ...], tag: str) -> None:
    """Admit prompts and run their prefill step, so the next schedule is decode-only."""
    gen = torch.Generator().manual_seed(len(tag))
    for i, n in enumerate(lengths):
        prompt = torch.randint(1, TINY.vocab_size, (n,), generator=gen).tolist()
        engine.add_request(f"{tag}-{i}", prompt, SamplingParams(max_tokens=8, ignore_eos=True))
    engine.step()


def drain(engine: LLMEngine) -> None:
    while engine.has_work():
        engine.step()


def test_executor_follows_the_config_and_captures_every_bucket_at_startup(engine: LLMEngine,
                                                                          eager_engine: LLMEngine) -> None:
    assert isinstance(engine.executor, DecodeLookahead) and engine.lookahead is engine.executor
    assert engine.executor.graphs.captured_buckets == decode_buckets(8)
    assert type(eager_engine.executor) is EagerExecutor and eager_engine.lookahead is None
    no_lookahead = twin(engine, decode_lookahead=False)
    assert type(no_lookahead.executor) is GraphedExecutor and no_lookahead.lookahead is None
    assert no_lookahead.scheduler.config.lookahead_tokens == 0


def test_graphed_decode_matches_eager_token_for_token_on_a_small_random_model(
    engine: LLMEngine, eager_engine: LLMEngine,
) -> None:
    prompt_ids = prompts(TINY.vocab_size)
    graphed_out, graphed_steps, steps = generate(engine, prompt_ids, MAX_TOKENS)
    eager_out, eager_graphed, _ = generate(eager_engine, prompt_ids, MAX_TOKENS)
    assert graphed_out == eager_out
    assert [len(o) for o in graphed_out] == list(MAX_TOKENS)
    # Every step but the prefill replayed a graph; with graphs off none did.
    assert graphed_steps == steps - 1 and eager_graphed == 0


def test_graphed_decode_step_never_syncs_the_host(engine: LLMEngine) -> None:
    into_decode(engine, (5, 20, 33), "nosync")
    for _ in range(2):  # the second step also re-fills the pinned staging the first one uploaded from
        batch = engine.schedule()
        assert is_graphed(engine, batch)
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.inference_mode():
                step = engine.executor.launch(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert step is not None
        engine.postprocess(batch, step.to_output(step.token_ids.tolist()))
    drain(engine)


def test_padded_rows_write_no_kv_and_real_rows_write_only_their_slot(engine: LLMEngine) -> None:
    into_decode(engine, (7, 16, 30), "pad")  # 3 sequences replay the bucket of 4: one padded row
    out = engine.schedule()
    assert is_graphed(engine, out) and len(out.chunks) == 3
    bs = engine.kv_cache.block_size
    slots = [c.seq.block_table[c.start // bs] * bs + c.start % bs for c in out.chunks]
    before = [(k.clone(), v.clone()) for k, v in zip(engine.kv_cache.k, engine.kv_cache.v, strict=True)]
    lookahead = engine.lookahead
    launched = lookahead.launched if lookahead is not None else 0
    engine.postprocess(out, engine.execute(out))
    if lookahead is not None and lookahead.launched > launched:
        # The step launched ahead wrote each sequence's next position too (rewritten identically next step).
        slots += [c.seq.block_table[(c.start + 1) // bs] * bs + (c.start + 1) % bs for c in out.chunks]
        torch.cuda.synchronize()
    written = torch.zeros(engine.kv_cache.num_blocks * bs, dtype=torch.bool, device="cuda")
    written[slots] = True
    for (k0, v0), k, v in zip(before, engine.kv_cache.k, engine.kv_cache.v, strict=True):
        for old, new in ((k0, k), (v0, v)):
            changed = (old != new).flatten(2).any(-1).flatten()  # per slot
            assert torch.equal(changed, written)
    drain(engine)


@pytest.fixture(scope="module")
def embedded_engine() -> LLMEngine:
    try:
        embedded_model_path()
    except ModelPathError as err:
        pytest.skip(f"embedded model not available: {err}")
    pytest.importorskip("gguf")
    # fp32: graphed and eager steps may differ in the last bits (another split-K count, another GEMM M);
    # fp32 keeps that far below the gaps greedy decoding sees on a real model.
    return LLMEngine(EngineConfig(device="cuda", dtype="float32", num_kv_blocks=64, max_num_seqs=4,
                                  max_batch_tokens=64))


@pytest.mark.slow
def test_embedded_model_graphed_decode_matches_eager_token_for_token(embedded_engine: LLMEngine) -> None:
    prompt_ids = [
        [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712,
         8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 31469, 6740, 335, 2591, 47, 2, 198, 1, 520, 9531, 198],
        [1604, 3987, 46477, 24, 94, 727, 472, 1620, 14362, 260, 304, 29, 373, 24681, 46477, 1230, 7996, 198],
        [6403, 1980, 253, 655, 28, 281, 253, 1165, 6560, 418, 260, 5595, 282, 253, 1109, 3150, 28, 665, 4161],
    ]
    max_tokens = (32, 20, 27)
    graphed_out, graphed_steps, _ = generate(embedded_engine, prompt_ids, max_tokens)
    eager_out, _, _ = generate(twin(embedded_engine, cuda_graphs=False), prompt_ids, max_tokens)
    assert graphed_out == eager_out
    assert graphed_steps >= max(max_tokens) - 3  # prefill chunks aside, decode steps replayed graphs


def test_decode_lookahead_changes_no_token_and_serves_most_steps(engine: LLMEngine) -> None:
    # Greedy and seeded sampling, a batch that shrinks as requests finish, one abort mid-run: the same
    # tokens with the step launched ahead as without it.
    prompt_ids = prompts(TINY.vocab_size)
    params = [SamplingParams(max_tokens=m, ignore_eos=True, temperature=0.0 if i % 2 else 0.8, seed=7 + i)
              for i, m in enumerate(MAX_TOKENS)]

    def run(engine: LLMEngine, tag: str) -> list[list[int]]:
        seqs = [engine.add_request(f"{tag}-{i}", p, sp)
                for i, (p, sp) in enumerate(zip(prompt_ids[:-1], params[:-1], strict=True))]
        steps = 0
        while engine.has_work():
            engine.step()
            steps += 1
            if steps == 6:
                engine.abort(seqs[0].request_id)
            if steps == 9:  # a newcomer while a step is in flight: it joins one step later
                seqs.append(engine.add_request(f"{tag}-late", prompt_ids[-1], params[-1]))
        return [s.output_token_ids for s in seqs]

    lookahead = engine.lookahead
    assert lookahead is not None  # a CUDA engine has it by default
    lookahead.drop()  # an earlier test's last step launched one ahead: not this test's business
    used_before, dropped_before = lookahead.used, lookahead.dropped
    with_lookahead = run(engine, "ahead")
    assert lookahead.used - used_before >= 10
    assert lookahead.dropped == dropped_before  # every step launched ahead was the step the engine ran
    without = run(twin(engine, decode_lookahead=False), "plain")
    assert with_lookahead == without


def test_verify_step_gives_the_tokens_of_graphed_single_steps(engine: LLMEngine) -> None:
    # A verify step is not graphed (nor launched ahead): it runs eagerly through the Triton kernels and
    # must still give, position by position, the tokens the graphed single steps gave.
    prompt = prompts(TINY.vocab_size)[3]
    sampling = SamplingParams(max_tokens=10, ignore_eos=True)  # greedy: eager, graphed logits differ in bits
    (reference,) = engine.generate([prompt], sampling)
    seq = engine.add_request("verify", prompt, sampling)
    engine.step()
    seq.draft_token_ids = reference[1:5]
    batch = engine.schedule()
    assert not is_graphed(engine, batch) and batch.chunks[0].num_sampled == 5
    engine.postprocess(batch, engine.execute(batch))
    assert seq.output_token_ids == reference[:6]
    seq.draft_token_ids = [reference[6], (reference[7] + 1) % TINY.vocab_size]
    engine.step()
    assert seq.output_token_ids == reference[:8]
    drain(engine)
    assert seq.output_token_ids == reference
