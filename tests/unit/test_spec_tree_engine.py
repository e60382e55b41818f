"""Tree drafts in the engine step: greedy identity with plain decoding, blocks never leaked, chain trees."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from contracts.sampling import SamplingParams
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.random_models import build_random_model
from engine.spec.config import MAX_TREE_NODES, SpecConfig
from engine.spec.head_drafter import HeadDrafter
from engine.spec.head_tree import head_tree_drafts
from kernels.attention.metadata import MAX_TREE_ROWS
from tests.unit.test_spec_engine import PROMPTS, TINY, random_head_file, tiny_engine

pytestmark = pytest.mark.timeout(300)

GREEDY = SamplingParams(max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_model():
    return TINY, build_random_model(TINY, torch.float32, "cpu", seed=0)


@pytest.fixture(scope="module")
def tiny_head(tmp_path_factory) -> Path:
    # Drafts over 16 ids: some of the tiny target's argmax tokens, so some drafts are accepted, most not.
    return random_head_file(TINY, 16, 1, tmp_path_factory.mktemp("head") / "tree.safetensors")


def tree_spec(head: Path, branching=(2, 2, 1), max_nodes=None, adaptive=False) -> SpecConfig:
    return SpecConfig("head", head_path=str(head), adaptive=adaptive, tree_branching=branching,
                      tree_max_nodes=max_nodes)


def run(engine: LLMEngine, prompts, sampling: SamplingParams) -> tuple[list[list[int]], int, int]:
    """Outputs, how many tree verify chunks (not cut to chains) the steps ran, drafts accepted."""
    seqs = [engine.add_request(f"r{i}", p, sampling) for i, p in enumerate(prompts)]
    trees = 0
    while engine.has_work():
        batch = engine.schedule()
        trees += sum(c.tree is not None for c in batch.chunks)
        engine.postprocess(batch, engine.execute(batch))
    return [s.output_token_ids for s in seqs], trees, sum(s.num_accepted_tokens for s in seqs)


@pytest.mark.parametrize("spec_kw", [dict(), dict(branching=(3, 2, 2), max_nodes=7), dict(adaptive=True)],
                         ids=["2-2-1", "pruned", "adaptive"])
def test_tree_drafts_give_the_tokens_of_plain_greedy_decoding(tiny_model, tiny_head, spec_kw) -> None:
    reference = tiny_engine(tiny_model, SpecConfig()).generate(PROMPTS, GREEDY)
    accepted = 0
    for prompts in ([PROMPTS[3]], PROMPTS):  # batch 1, then four sequences of different acceptance
        engine = tiny_engine(tiny_model, tree_spec(tiny_head, **spec_kw))
        outputs, trees, kept = run(engine, prompts, GREEDY)
        assert outputs == (reference[3:] if len(prompts) == 1 else reference)
        assert trees > 0
        accepted += kept
        assert engine.block_manager.num_free == engine.block_manager.num_total
        assert engine.speculator.num_drafting == 0
        engine.block_manager.check_invariants()
    assert accepted > 0 or spec_kw.get("adaptive")  # adaptive depth may rightly stop drafting a poor head


def test_tree_drafts_accept_off_the_first_branch(tiny_model, tiny_head) -> None:
    """Some accepted paths leave the head's top-1 chain: what a tree adds over a chain."""
    engine = tiny_engine(tiny_model, tree_spec(tiny_head, branching=(4, 2)))
    seqs = [engine.add_request(f"r{i}", p, GREEDY) for i, p in enumerate(PROMPTS)]
    off_chain = 0
    while engine.has_work():
        batch = engine.schedule()
        engine.postprocess(batch, engine.execute(batch))
        for chunk in batch.chunks:
            kept = chunk.seq.num_tokens - chunk.output_start - 1
            if chunk.tree is not None and kept:
                path = chunk.tree.path(chunk.seq.token_ids[chunk.output_start:chunk.output_start + kept])
                off_chain += path[1] != 1
    assert sum(s.num_accepted_tokens for s in seqs) > 0 and off_chain > 0


def test_tree_drafts_work_with_the_prefix_cache_and_preemption(tiny_model, tiny_head) -> None:
    sampling = SamplingParams(max_tokens=48, ignore_eos=True)
    shared = PROMPTS[3] * 2
    prompts = [shared, shared + [1, 2], shared + [9], PROMPTS[0]]
    # 16 blocks x 16 tokens: someone gets preempted. The split-fused credit is off: it paces prefill by
    # measured step times, so whether prompts are admitted soon enough to preempt would depend on the clock.
    config = dict(num_kv_blocks=16, max_batch_tokens=64, fused_step_max_slowdown=0.0)
    reference = LLMEngine(EngineConfig(device="cpu", dtype="float32", max_num_seqs=8, **config),
                          model=tiny_model).generate(prompts, sampling)
    engine = tiny_engine(tiny_model, tree_spec(tiny_head, branching=(3, 2, 1)), **config)
    seqs = [engine.add_request(f"r{i}", p, sampling) for i, p in enumerate(prompts)]
    preempted = trees = 0
    while engine.has_work():
        batch = engine.schedule()
        preempted += len(batch.preempted)
        trees += batch.has_tree
        engine.postprocess(batch, engine.execute(batch))
    assert [s.output_token_ids for s in seqs] == reference
    assert preempted and trees and engine.scheduler.prefix.hit_tokens > 0
    assert engine.block_manager.num_free == engine.block_manager.num_total
    engine.block_manager.check_invariants()


def test_abort_mid_tree_verify_keeps_block_counts_exact(tiny_model, tiny_head) -> None:
    engine = tiny_engine(tiny_model, tree_spec(tiny_head, branching=(3, 3)))
    bm = engine.block_manager
    for rounds in range(6):  # many steps, aborting one sequence between a tree verify and its postprocess
        a = engine.add_request(f"a{rounds}", PROMPTS[0] * 3, SamplingParams(max_tokens=60, ignore_eos=True))
        b = engine.add_request(f"b{rounds}", PROMPTS[1] * 5, SamplingParams(max_tokens=60, ignore_eos=True))
        for _ in range(rounds + 1):
            engine.step()
        batch = engine.schedule()
        (chunk_a,) = [c for c in batch.chunks if c.seq is a]
        assert chunk_a.tree is not None and len(a.block_table) == bm.blocks_needed(
            a.num_tokens + len(chunk_a.draft_token_ids))
        out = engine.execute(batch)
        assert engine.abort(a.request_id)
        engine.postprocess(batch, out)
        assert a.block_table == [] and bm.num_free == bm.num_total - len(b.block_table)
        bm.check_invariants()
        while engine.has_work():
            engine.step()
        assert bm.num_free == bm.num_total and engine.speculator.num_drafting == 0


def test_a_chain_shaped_tree_drafts_and_verifies_as_the_chain(tiny_model, tiny_head) -> None:
    """Branching (1, 1, 1): the head's tree is its chain (propose(3)), scheduled as a chain verify."""
    engine = tiny_engine(tiny_model, tree_spec(tiny_head, branching=(1, 1, 1)))
    chain = tiny_engine(tiny_model, SpecConfig("head", k=3, head_path=str(tiny_head), adaptive=False))
    outputs, trees, accepted = run(engine, PROMPTS, GREEDY)
    assert trees == 0 and (outputs, accepted) == run(chain, PROMPTS, GREEDY)[::2]
    head = engine.speculator.head
    drafter = HeadDrafter(head, engine.model.embed_tokens)
    torch.manual_seed(0)
    features = torch.randn(6, 3 * head.config.hidden_size)
    drafter.accept(list(range(10, 17)), features)
    tree = head_tree_drafts(drafter, 16, (1, 1, 1))
    assert tree.is_chain and list(tree.tokens[1:]) == drafter.propose(3)


def test_tree_spec_config_errors_name_the_value() -> None:
    assert MAX_TREE_NODES == MAX_TREE_ROWS - 1  # the torch-free config's copy of the mask's rows
    with pytest.raises(ValueError, match="for spec method 'head'"):
        SpecConfig("ngram", tree_branching=(2, 1))
    with pytest.raises(ValueError, match="each >= 1"):
        SpecConfig("head", tree_branching=(2, 0))
    with pytest.raises(ValueError, match="at most 63"):
        SpecConfig("head", tree_branching=(4, 4, 4))
    assert SpecConfig("head", tree_branching=(2, 2, 1), tree_max_nodes=5).describe() == \
        "head tree=2,2,1 max_nodes=5 adaptive"
