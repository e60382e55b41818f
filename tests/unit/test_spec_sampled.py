"""Sampled head drafts at T > 0: the engine's output follows the target's distribution (chi-square)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from contracts.sampling import SamplingParams
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.random_models import PRESETS, build_random_model
from engine.sampler import processed_probs
from engine.spec.config import SpecConfig
from engine.spec.target_forward import TargetForward
from tests.unit.test_spec_engine import random_head_file
from tests.unit.test_spec_rejection import chi2_critical, chi_square

pytestmark = pytest.mark.timeout(300)

# An 8-token vocabulary keeps the joint distribution of two tokens small enough to count; the head drafts
# over 6 of the 8 ids, so q is 0 on two tokens the target can emit (the d2t mapping is exercised).
SMALL = dataclasses.replace(PRESETS["tiny"], vocab_size=8, eos_token_ids=())
PROMPT = [1, 2, 3]


@pytest.fixture(scope="module")
def small_model():
    return SMALL, build_random_model(SMALL, torch.float32, "cpu", seed=0)


@pytest.fixture(scope="module")
def small_head(tmp_path_factory) -> Path:
    return random_head_file(SMALL, 6, 2, tmp_path_factory.mktemp("head") / "small.safetensors")


def target_pairs(model, params: SamplingParams) -> torch.Tensor:
    """P(second output token, third output token) [V, V] after PROMPT, the first output summed out."""
    vocab = SMALL.vocab_size
    forward = TargetForward(model, num_slots=1, max_len=16)
    try:
        def next_probs(tokens: list[int]) -> torch.Tensor:
            hidden, _ = forward.forward([(0, 0, tokens)])
            return processed_probs(model.compute_logits(hidden[-1:]), [params])[0]
        p0 = next_probs(PROMPT)
        pairs = torch.zeros(vocab, vocab)
        for t0 in range(vocab):
            p1 = next_probs(PROMPT + [t0])
            for t1 in range(vocab):
                pairs[t1] += p0[t0] * p1[t1] * next_probs(PROMPT + [t0, t1])
    finally:
        forward.close()
    return pairs


def run(small_model, head: Path, params: list[SamplingParams], spec_k: int = 2,
        tree: tuple[int, ...] | None = None) -> tuple[list, LLMEngine]:
    """Decode `params` with head drafts (chains of spec_k, or `tree` branching); checks that drafts were
    rejection-sampled (chains: chunks with draft probabilities; trees: tree chunks) and no block leaked."""
    spec = (SpecConfig("head", k=spec_k, head_path=str(head), adaptive=False) if tree is None else
            SpecConfig("head", head_path=str(head), adaptive=False, tree_branching=tree))
    config = EngineConfig(device="cpu", dtype="float32", num_kv_blocks=300, max_num_seqs=256, spec=spec)
    engine = LLMEngine(config, model=small_model)
    seqs = [engine.add_request(f"r{i}", PROMPT, p) for i, p in enumerate(params)]
    sampled_verifies = 0
    while engine.has_work():
        batch = engine.schedule()
        sampled_verifies += sum((c.draft_probs if tree is None else c.tree) is not None for c in batch.chunks)
        engine.postprocess(batch, engine.execute(batch))
    assert sampled_verifies > 0  # the head's drafts were rejection-sampled, not matched
    assert engine.block_manager.num_free == engine.block_manager.num_total
    return seqs, engine


def pair_counts(seqs) -> torch.Tensor:
    """[V, V] counts of (second, third) output tokens over `seqs`."""
    counts = torch.zeros(SMALL.vocab_size, SMALL.vocab_size)
    for s in seqs:
        counts[s.output_token_ids[1], s.output_token_ids[2]] += 1
    return counts


def test_sampled_head_drafts_keep_the_target_distribution_at_t1(small_model, small_head) -> None:
    n = 2000
    params = [SamplingParams(max_tokens=4, temperature=1.0, seed=i, ignore_eos=True) for i in range(n)]
    seqs, _ = run(small_model, small_head, params)
    drafted = sum(s.num_draft_tokens for s in seqs)
    accepted = sum(s.num_accepted_tokens for s in seqs)
    assert 0 < accepted < drafted  # both branches: kept drafts and residual draws
    counts = pair_counts(seqs)
    pairs = target_pairs(small_model[1], params[0])
    stat, df = chi_square(counts.flatten(), pairs.flatten())
    assert stat < chi2_critical(df), (stat, df)
    first = counts.sum(dim=1)  # the second output token alone
    stat, df = chi_square(first, pairs.sum(dim=1))
    assert stat < chi2_critical(df), (stat, df)


def test_tree_drafts_keep_the_target_distribution_at_t1(small_model, small_head) -> None:
    """Top-k head trees walked by multi-candidate sampling (engine/spec/tree.py) through the engine."""
    n = 2000
    params = [SamplingParams(max_tokens=4, temperature=1.0, seed=i, ignore_eos=True) for i in range(n)]
    seqs, _ = run(small_model, small_head, params, tree=(3, 2))
    accepted = sum(s.num_accepted_tokens for s in seqs)
    assert 0 < accepted < sum(s.num_draft_tokens for s in seqs)
    counts = pair_counts(seqs)
    pairs = target_pairs(small_model[1], params[0])
    stat, df = chi_square(counts.flatten(), pairs.flatten())
    assert stat < chi2_critical(df), (stat, df)


def test_sampled_drafts_repeat_for_a_seed_and_greedy_stays_argmax(small_model, small_head) -> None:
    seeded = [SamplingParams(max_tokens=12, temperature=0.8, top_k=5, top_p=0.9, seed=s, ignore_eos=True)
              for s in (5, 6)]
    greedy = [SamplingParams(max_tokens=12, ignore_eos=True)]
    first, engine = run(small_model, small_head, seeded + greedy, spec_k=3)
    again, _ = run(small_model, small_head, seeded + greedy, spec_k=3)
    assert [s.output_token_ids for s in first] == [s.output_token_ids for s in again]
    plain = LLMEngine(EngineConfig(device="cpu", dtype="float32", num_kv_blocks=64),
                      model=small_model).generate([PROMPT], greedy[0])
    assert first[2].output_token_ids == plain[0]
    assert engine.speculator.num_drafting == 0


def test_abort_mid_sampled_verify_keeps_block_counts_exact(small_model, small_head) -> None:
    config = EngineConfig(device="cpu", dtype="float32", num_kv_blocks=16, block_size=4,
                          spec=SpecConfig("head", k=4, head_path=str(small_head), adaptive=False))
    engine = LLMEngine(config, model=small_model)
    sampling = SamplingParams(max_tokens=40, temperature=1.0, seed=9, ignore_eos=True)
    a = engine.add_request("a", PROMPT * 3, sampling)
    b = engine.add_request("b", PROMPT * 2, sampling)
    engine.step()
    batch = engine.schedule()
    (chunk_a,) = [c for c in batch.chunks if c.seq is a]
    assert chunk_a.draft_probs is not None and chunk_a.draft_probs.shape == (4, SMALL.vocab_size)
    out = engine.execute(batch)
    assert engine.abort("a")  # between the rejection-sampled verify and its postprocess
    engine.postprocess(batch, out)
    bm = engine.block_manager
    assert a.block_table == [] and bm.num_free == bm.num_total - len(b.block_table)
    bm.check_invariants()
    while engine.has_work():
        engine.step()
    assert bm.num_free == bm.num_total and engine.speculator.num_drafting == 0
