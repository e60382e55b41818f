"""Fair prefill under a token budget: a short prompt is not held behind a long one (no model)."""
from __future__ import annotations

import pytest

from contracts.sampling import SamplingParams
from engine.block_manager import BlockManager
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import Sequence

pytestmark = pytest.mark.timeout(60)


def make(**cfg) -> Scheduler:
    cfg = {"max_batch_tokens": 512, "max_num_seqs": 8, "max_model_len": 8192} | cfg
    return Scheduler(SchedulerConfig(block_size=16, **cfg), BlockManager(600, 16))


def seq(rid: str, n: int, max_tokens: int = 4) -> Sequence:
    tokens = [10 + i % 90 for i in range(n)]
    return Sequence(rid, tokens, SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def steps_until_first_token(sched: Scheduler, rid: str, limit: int = 50) -> int:
    for step in range(1, limit + 1):
        out = sched.schedule()
        sched.postprocess(out, {c.seq.request_id: (7,) * c.num_sampled for c in out.chunks if c.num_sampled})
        got = sched.get(rid)
        if got is None or got.num_output_tokens:
            return step
    raise AssertionError(f"{rid} produced no token in {limit} steps")


def run_one_chunk_of(sched: Scheduler, rid: str) -> None:
    out = sched.schedule()
    assert [c.seq.request_id for c in out.chunks] == [rid]
    sched.postprocess(out, {})


def test_without_the_threshold_a_short_prompt_waits_for_the_whole_long_one():
    sched = make()
    sched.add(seq("long", 4096))
    run_one_chunk_of(sched, "long")
    sched.add(seq("short", 2))
    assert steps_until_first_token(sched, "short") == 8  # 3584 tokens left at 512 a step, then it


def test_with_the_threshold_a_short_prompt_starts_in_the_next_step():
    sched = make(long_prefill_token_threshold=256)
    sched.add(seq("long", 4096))
    run_one_chunk_of(sched, "long")  # alone: it may take the whole budget
    assert sched.get("long").num_computed_tokens == 512
    sched.add(seq("short", 2))
    out = sched.schedule()
    sizes = {c.seq.request_id: c.num_new_tokens for c in out.chunks}
    assert sizes == {"long": 256, "short": 2}  # the budget is shared, the long prompt still progresses


def test_only_max_long_partial_prefills_long_prompts_progress_and_short_ones_overtake_the_rest():
    sched = make(long_prefill_token_threshold=256, max_long_partial_prefills=1)
    for rid, n in (("long-a", 2000), ("long-b", 2000), ("short", 3)):
        sched.add(seq(rid, n))
    out = sched.schedule()
    assert {c.seq.request_id: c.num_new_tokens for c in out.chunks} == {"long-a": 256, "short": 3}
    sched = make(long_prefill_token_threshold=200, max_long_partial_prefills=2)
    for rid, n in (("long-a", 2000), ("long-b", 2000), ("short", 3)):
        sched.add(seq(rid, n))
    out = sched.schedule()
    assert {c.seq.request_id: c.num_new_tokens for c in out.chunks} == {"long-a": 200, "long-b": 200,
                                                                       "short": 3}


def test_decodes_beside_a_long_local_prefill_share_the_step_with_a_capped_chunk():
    """Split-fused on a decode worker: running streams keep decoding while a long prompt runs in chunks."""
    sched = make(long_prefill_token_threshold=128)
    for i in range(4):
        sched.add(seq(f"d{i}", 8, max_tokens=100))
    steps_until_first_token(sched, "d3")
    sched.add(seq("long", 3000))
    for _ in range(5):
        out = sched.schedule()
        sizes = {c.seq.request_id: c.num_new_tokens for c in out.chunks}
        assert sizes == {"d0": 1, "d1": 1, "d2": 1, "d3": 1, "long": 128}
        sched.postprocess(out, {f"d{i}": (7,) for i in range(4)})


def test_thresholds_are_validated():
    with pytest.raises(ValueError, match="long_prefill_token_threshold"):
        make(long_prefill_token_threshold=-1)
    with pytest.raises(ValueError, match="max_long_partial_prefills"):
        make(max_long_partial_prefills=0)
