"""Speculation in the engine step: greedy identity with spec on/off, seeded sampling, drafter lifecycle."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from contracts.sampling import SamplingParams
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.random_models import PRESETS, build_random_model
from engine.spec.config import SpecConfig
from engine.spec.draft_head import DraftHead, DraftHeadConfig, build_vocab_map

pytestmark = pytest.mark.timeout(300)

TINY = PRESETS["tiny"]
# Short prompts that repeat themselves (the n-gram drafter finds matches) and ones that do not.
PROMPTS = [[5, 17, 300, 42, 9, 5, 17, 300], [7, 7, 7, 7], [100, 200, 300, 400, 500, 11, 12],
           [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4, 3, 3, 8, 3, 2, 7, 9]]


@pytest.fixture(scope="module")
def tiny_model():
    return TINY, build_random_model(TINY, torch.float32, "cpu", seed=0)


def random_head_file(target, draft_vocab: int, seed: int, path: Path) -> Path:
    """An untrained head for `target` (features of layers 0, 1, 1) saved at `path`: drafts to verify."""
    torch.manual_seed(seed)
    head = DraftHead(DraftHeadConfig.for_target(target, (0, 1, 1), draft_vocab))
    head.d2t.copy_(build_vocab_map(torch.randint(0, 50, (target.vocab_size,)), draft_vocab))
    head.save(path, dtype=torch.float32)
    return path


@pytest.fixture(scope="module")
def tiny_head(tmp_path_factory) -> Path:
    return random_head_file(TINY, 128, 1, tmp_path_factory.mktemp("head") / "tiny.safetensors")


def tiny_engine(tiny_model, spec: SpecConfig, **kw) -> LLMEngine:
    config = EngineConfig(**{"device": "cpu", "dtype": "float32", "num_kv_blocks": 64, "max_num_seqs": 8,
                             "spec": spec, **kw})
    return LLMEngine(config, model=tiny_model)


def spec_configs(head: Path) -> list[SpecConfig]:
    return [SpecConfig("ngram", k=4), SpecConfig("ngram", k=3, adaptive=False),
            SpecConfig("head", k=4, head_path=str(head))]


@pytest.mark.parametrize("sampling", [
    SamplingParams(max_tokens=40, ignore_eos=True),
    SamplingParams(max_tokens=40, ignore_eos=True, temperature=0.8, seed=3),  # drawn per (seed, position)
], ids=["greedy", "seeded"])
def test_speculation_gives_the_tokens_of_plain_decoding(tiny_model, tiny_head, sampling) -> None:
    reference = tiny_engine(tiny_model, SpecConfig()).generate(PROMPTS, sampling)
    for spec in spec_configs(tiny_head):
        if spec.method == "head" and not sampling.greedy:
            continue  # it samples drafts at T > 0: the same distribution, not text (test_spec_sampled)
        engine = tiny_engine(tiny_model, spec)
        assert engine.generate(PROMPTS, sampling) == reference, spec
        assert engine.block_manager.num_free == engine.block_manager.num_total
        assert engine.speculator.num_drafting == 0  # every finished sequence dropped its drafter


def test_ngram_drafts_are_verified_and_counted(tiny_model) -> None:
    engine = tiny_engine(tiny_model, SpecConfig("ngram", k=4))
    seqs = [engine.add_request(f"r{i}", p, SamplingParams(max_tokens=40, ignore_eos=True))
            for i, p in enumerate(PROMPTS)]
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
    drafted = sum(s.num_draft_tokens for s in seqs)
    accepted = sum(s.num_accepted_tokens for s in seqs)
    assert drafted > 0 and 0 < accepted <= drafted
    assert steps < 40  # accepted drafts saved steps (one prefill step + at most 39 decode steps without)


def test_speculation_works_with_the_prefix_cache_and_preemption(tiny_model, tiny_head) -> None:
    sampling = SamplingParams(max_tokens=48, ignore_eos=True)
    shared = PROMPTS[3] * 2  # later prompts start from its cached blocks
    prompts = [shared, shared + [1, 2], shared + [9], PROMPTS[0]]
    # 16 blocks x 16 tokens: someone gets preempted. The split-fused credit is off: it paces prefill by
    # measured step times, so whether prompts are admitted soon enough to preempt would depend on the clock.
    config = dict(num_kv_blocks=16, max_batch_tokens=64, fused_step_max_slowdown=0.0)
    reference = LLMEngine(EngineConfig(device="cpu", dtype="float32", max_num_seqs=8, **config),
                          model=tiny_model).generate(prompts, sampling)
    for spec in spec_configs(tiny_head):
        engine = tiny_engine(tiny_model, spec, **config)
        seqs = [engine.add_request(f"r{i}", p, sampling) for i, p in enumerate(prompts)]
        preempted = 0
        while engine.has_work():
            batch = engine.schedule()
            preempted += len(batch.preempted)
            engine.postprocess(batch, engine.execute(batch))
        assert [s.output_token_ids for s in seqs] == reference, spec
        assert preempted and engine.scheduler.prefix.hit_tokens > 0
        assert engine.block_manager.num_free == engine.block_manager.num_total
        engine.block_manager.check_invariants()


def test_abort_mid_verify_keeps_block_counts_exact(tiny_model, tiny_head) -> None:
    for spec in spec_configs(tiny_head):
        engine = tiny_engine(tiny_model, spec)
        a = engine.add_request("a", PROMPTS[0] * 3, SamplingParams(max_tokens=60, ignore_eos=True))
        b = engine.add_request("b", PROMPTS[1] * 5, SamplingParams(max_tokens=60, ignore_eos=True))
        engine.step()
        a.draft_token_ids = a.draft_token_ids or [1, 2, 3]  # a verify step for a, whatever it drafted
        batch = engine.schedule()
        (chunk_a,) = [c for c in batch.chunks if c.seq is a]
        assert chunk_a.draft_token_ids and len(a.block_table) == engine.block_manager.blocks_needed(
            a.num_tokens + len(chunk_a.draft_token_ids))
        out = engine.execute(batch)
        assert engine.abort("a")  # between the verify forward and its postprocess
        engine.postprocess(batch, out)
        assert a.block_table == [] and engine.speculator.num_drafting == 1
        bm = engine.block_manager
        assert bm.num_free == bm.num_total - len(b.block_table)
        bm.check_invariants()
        while engine.has_work():
            engine.step()
        assert bm.num_free == bm.num_total and engine.speculator.num_drafting == 0


def test_spec_config_errors_name_the_value() -> None:
    with pytest.raises(ValueError, match="spec method"):
        SpecConfig("eagle")
    with pytest.raises(ValueError, match="k must be"):
        SpecConfig("ngram", k=0)
    with pytest.raises(ValueError, match="tp_size"):
        EngineConfig(tp_size=2, spec=SpecConfig("ngram"))


def test_a_head_for_another_target_fails_at_engine_start(tiny_model, tmp_path) -> None:
    other = DraftHead(DraftHeadConfig.for_target(PRESETS["smollm2-135m"], (2, 15, 27), 64))
    path = tmp_path / "other.safetensors"
    other.save(path)
    with pytest.raises(ValueError, match="does not fit"):
        tiny_engine(tiny_model, SpecConfig("head", head_path=str(path)))
