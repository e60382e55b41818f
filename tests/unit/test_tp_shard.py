"""Sharding transform: which heads a rank owns, and TP=2/TP=4 on gloo ranks matching TP=1 (logits within
tolerance, greedy tokens identical) on the tiny preset and the embedded model's head layout (9 q / 3 kv)."""
from dataclasses import replace

import pytest
import torch

from contracts.sampling import SamplingParams
from engine.config import EngineConfig
from engine.executors.batch_inputs import prepare_inputs
from engine.kv_cache import KVCache
from engine.llm_engine import LLMEngine
from engine.model import LlamaModel
from engine.random_models import PRESETS, build_random_model
from engine.scheduler import ScheduledChunk
from engine.sequence import Sequence
from engine.tp.group import TPGroup
from engine.tp.heads import TPShapeError, head_shard
from engine.tp.local_ranks import run_local_ranks

CONFIGS = {
    "tiny": PRESETS["tiny"],
    # SmolLM2-135M's head layout and widths, two layers, a vocab not divisible by 4 (uneven vocab shards).
    "smollm2-2l": replace(PRESETS["smollm2-135m"], num_layers=2, vocab_size=1002),
}
ENGINE = EngineConfig(num_kv_blocks=32, max_batch_tokens=64, max_num_seqs=4)
PROMPTS = [[5, 17, 42, 9, 33, 100, 7, 64, 12, 3, 88, 21], [3, 1, 4, 1, 5, 9, 2, 6]]
GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)


def test_head_shard_splits_groups_then_replicates_kv():
    # 3 kv heads on 2 ranks: whole GQA groups, uneven (2 + 1), nothing stored twice.
    assert head_shard(9, 3, 0, 2).kv_heads == (0, 1) and head_shard(9, 3, 0, 2).q_heads == range(0, 6)
    assert head_shard(9, 3, 1, 2).kv_heads == (2,) and head_shard(9, 3, 1, 2).q_heads == range(6, 9)
    # 4 ranks > 3 kv heads: q heads 3+2+2+2; rank 2 reads kv heads 1 and 2 once each (kv 1 on two ranks).
    shards = [head_shard(9, 3, r, 4) for r in range(4)]
    assert [len(s.q_heads) for s in shards] == [3, 2, 2, 2]
    assert [s.kv_heads for s in shards] == [(0,), (1,), (1, 2), (2,)]
    # Query heads that read kv heads unequally often get one kv copy each (one GQA ratio per rank).
    assert head_shard(6, 2, 1, 4).q_heads == range(2, 4) and head_shard(6, 2, 1, 4).kv_heads == (0, 1)
    assert head_shard(9, 3, 0, 5).kv_heads == (0,)
    assert head_shard(9, 3, 1, 5).kv_heads == (0, 1)  # q 2, 3: one of group 0, one of group 1
    with pytest.raises(TPShapeError, match="exceeds"):
        head_shard(4, 2, 0, 8)


def _prefill_logits(model: LlamaModel, kv: KVCache, prompt: list[int]) -> torch.Tensor:
    seq = Sequence("p", list(prompt), GREEDY, block_table=list(range(-(-len(prompt) // kv.block_size))))
    chunk = ScheduledChunk(seq, 0, len(prompt), 1)
    ids, pos, meta = prepare_inputs([chunk], kv.block_size, torch.device("cpu"))
    with torch.no_grad():
        return model.compute_logits(model(ids, pos, meta, kv))


def _generate(engine: LLMEngine, group: TPGroup) -> list[list[int]] | int:
    """Rank 0 schedules and samples (→ its tokens); the others follow its steps (→ how many they ran)."""
    if group.rank == 0:
        tokens = engine.generate(PROMPTS, GREEDY)
        engine.stop_followers()
        return tokens
    return engine.follow()


def _compare(group: TPGroup, variants: tuple[tuple[str, str, int], ...]) -> dict:
    """Per (model name, tp_comm, overlap chunks): TP=1's and this rank's prefill logits and greedy tokens."""
    out = {}
    for name, comm, chunks in variants:
        config = CONFIGS[name]
        ref = None
        if group.rank == 0:  # TP=1 reference, on rank 0 only
            full = build_random_model(config, torch.float32, "cpu", seed=1)
            logits = _prefill_logits(full, KVCache.for_model(config, ENGINE), PROMPTS[0])
            ref = (logits, LLMEngine(ENGINE, model=(config, full)).generate(PROMPTS, GREEDY))
        tp_config = replace(ENGINE, tp_size=group.size, tp_comm=comm, tp_overlap_chunks=chunks,
                            tp_overlap_min_tokens=2)
        built = build_random_model(config, torch.float32, "cpu", seed=1)
        engine = LLMEngine(tp_config, model=(config, built), tp=group)
        logits = _prefill_logits(engine.model, engine.kv_cache, PROMPTS[0])
        out[(name, comm, chunks)] = {"ref": ref, "tp": (logits, _generate(engine, group)),
                                     "kv_heads": engine.kv_cache.num_kv_heads}
    return out


def _check(results: list[dict], variants: tuple[tuple[str, str, int], ...]) -> None:
    for variant in variants:
        ref_logits, ref_tokens = results[0][variant]["ref"]
        for rank in results:
            logits, tokens = rank[variant]["tp"]
            if variant[1] == "int8":
                # 8-bit all-reduces: close, not equal; random weights give near-tied logits, so greedy
                # tokens may legitimately differ (the quality bar is bench.quality.ppl on a real model).
                scale = ref_logits.abs().max()
                torch.testing.assert_close(logits, ref_logits, atol=float(0.05 * scale), rtol=0)
                continue
            torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
            if rank is results[0]:
                assert tokens == ref_tokens, variant
            else:  # a follower ran every step: the prefill chunk(s), then a decode step per later token
                assert tokens >= GREEDY.max_tokens - 1, variant


def test_tp2_matches_tp1():
    # tiny: even splits; smollm2-2l: 3 kv heads as 2 + 1 groups, with and without overlap chunks; int8 comm.
    variants = (("tiny", "bf16", 1), ("smollm2-2l", "bf16", 1), ("smollm2-2l", "bf16", 3),
                ("tiny", "int8", 1))
    results = run_local_ranks(_compare, 2, variants)
    _check(results, variants)
    assert [r[variants[1]]["kv_heads"] for r in results] == [2, 1]  # the rank's kv heads only


def test_tp4_matches_tp1_with_replicated_kv_heads():
    variants = (("smollm2-2l", "bf16", 2),)
    results = run_local_ranks(_compare, 4, variants)
    _check(results, variants)
    assert [r[variants[0]]["kv_heads"] for r in results] == [1, 1, 2, 1]
