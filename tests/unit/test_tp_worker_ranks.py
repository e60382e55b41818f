"""A TP=2 worker as one process plus one spawned follower: the same greedy tokens as TP=1, followers exit."""
import dataclasses

from contracts.sampling import SamplingParams
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.tp.worker_ranks import LocalTPRanks

CONFIG = EngineConfig(model_path="random:tiny", num_kv_blocks=32, max_batch_tokens=64, num_threads=1)
PROMPTS = [[7, 3, 99, 12, 41, 5, 8], [250, 251, 252]]
GREEDY = SamplingParams(max_tokens=5, ignore_eos=True)


def test_two_rank_worker_matches_one_rank():
    expected = LLMEngine(CONFIG).generate(PROMPTS, GREEDY)
    ranks = LocalTPRanks(dataclasses.replace(CONFIG, tp_size=2, tp_overlap_chunks=2, tp_overlap_min_tokens=2))
    try:
        assert ranks.engine.generate(PROMPTS, GREEDY) == expected
        assert ranks.engine.stats().tp_comm_bytes > 0
    finally:
        ranks.close()
    assert all(p.exitcode == 0 for p in ranks.followers)


def test_ranks_report_their_kv_heads_and_close_is_idempotent():
    ranks = LocalTPRanks(dataclasses.replace(CONFIG, tp_size=2))
    try:
        kv_heads = ranks.engine.model_config.num_kv_heads
        assert [r.rank for r in ranks.ranks] == [0, 1]
        assert sorted(h for r in ranks.ranks for h in r.kv_heads) == list(range(kv_heads))
        assert ranks.ranks[1].pid == ranks.followers[0].pid
    finally:
        ranks.close()
        ranks.close()
    assert all(p.exitcode == 0 for p in ranks.followers)
