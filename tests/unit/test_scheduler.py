"""Scheduler: token budget, chunked prefill, decode-first split-fused steps, preemption, stop rules, abort."""
from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from contracts.sampling import FinishReason, SamplingParams
from engine.block_manager import BlockManager
from engine.scheduler import Scheduler, SchedulerConfig, SchedulerError, SchedulerOutput, SequenceRejected
from engine.sequence import Sequence, SequenceStatus

pytestmark = pytest.mark.timeout(60)

EOS = 2
TokenFn = Callable[[str, int], int]


def fake_token(request_id: str, position: int) -> int:
    """Deterministic stand-in for the model: the token depends only on (request, position), never EOS."""
    return 100 + (sum(map(ord, request_id)) * 31 + position * 7) % 500


def make(num_blocks: int = 64, block_size: int = 4, **cfg) -> tuple[Scheduler, BlockManager]:
    cfg = {"max_batch_tokens": 32, "max_num_seqs": 8, "max_model_len": 1024, "eos_token_ids": (EOS,)} | cfg
    bm = BlockManager(num_blocks, block_size)
    return Scheduler(SchedulerConfig(block_size=block_size, **cfg), bm), bm


def seq(rid: str, prompt_len: int, **sp) -> Sequence:
    return Sequence(rid, [10 + i % 50 for i in range(prompt_len)], SamplingParams(**sp))


def check(out: SchedulerOutput, sched: Scheduler, bm: BlockManager) -> None:
    """What every SchedulerOutput must satisfy, whatever the workload."""
    assert out.num_batched_tokens <= sched.config.max_batch_tokens
    assert len({c.seq.request_id for c in out.chunks}) == len(out.chunks)
    for c in out.chunks:
        assert c.num_new_tokens >= 1
        assert c.start == c.seq.num_computed_tokens
        assert len(c.seq.block_table) * bm.block_size >= c.start + c.num_new_tokens
        assert c.num_sampled == (c.start + c.num_new_tokens == c.seq.num_tokens)
        assert c.seq.status is SequenceStatus.RUNNING
    tables = [b for s in sched._running + list(sched._awaiting.values()) for b in s.block_table]
    assert len(tables) == len(set(tables)) == bm.num_total - bm.num_free
    assert sched.num_running + sched.num_awaiting_kv <= sched.config.max_num_seqs
    bm.check_invariants()


def step(sched: Scheduler, bm: BlockManager,
         model: TokenFn = fake_token) -> tuple[SchedulerOutput, list[Sequence]]:
    out = sched.schedule()
    check(out, sched, bm)
    sampled = {c.seq.request_id: (model(c.seq.request_id, c.seq.num_tokens),)
               for c in out.chunks if c.num_sampled}
    return out, sched.postprocess(out, sampled)


def run_to_end(sched: Scheduler, bm: BlockManager, model: TokenFn = fake_token,
               max_steps: int = 2000) -> list[SchedulerOutput]:
    outs = []
    while sched.has_work():
        assert len(outs) < max_steps, "scheduler made no progress"
        outs.append(step(sched, bm, model)[0])
    return outs


def expected_output(s: Sequence, n: int) -> list[int]:
    return [fake_token(s.request_id, s.num_prompt_tokens + i) for i in range(n)]


def test_long_prompt_is_chunked_over_several_steps_within_budget():
    sched, bm = make(max_batch_tokens=32)
    s = seq("long", 100, max_tokens=1)
    sched.add(s)
    outs = run_to_end(sched, bm)
    prefill = [(c.start, c.num_new_tokens, c.num_sampled) for o in outs for c in o.chunks]
    assert prefill == [(0, 32, 0), (32, 32, 0), (64, 32, 0), (96, 4, 1)]
    assert s.finish_reason is FinishReason.LENGTH and s.output_token_ids == expected_output(s, 1)
    assert bm.num_free == bm.num_total


def test_decode_tokens_go_first_then_prefill_fills_the_budget_in_one_split_fused_step():
    sched, bm = make(max_batch_tokens=16)
    a = seq("a", 5, max_tokens=10)
    sched.add(a)
    step(sched, bm)  # a prefilled, now decoding
    b = seq("b", 40, max_tokens=2)
    sched.add(b)
    out, _ = step(sched, bm)
    got = [(c.seq.request_id, c.num_new_tokens, c.num_sampled) for c in out.chunks]
    assert got == [("a", 1, 1), ("b", 15, 0)]
    assert out.num_batched_tokens == 16


def test_decoding_sequences_are_served_oldest_first():
    sched, bm = make(max_batch_tokens=64)
    for rid in ("x", "y", "z"):
        sched.add(seq(rid, 3, max_tokens=5))
    step(sched, bm)
    out, _ = step(sched, bm)
    assert [c.seq.request_id for c in out.chunks] == ["x", "y", "z"]
    assert all(c.num_new_tokens == 1 for c in out.chunks)


def test_running_sequences_never_exceed_max_num_seqs():
    sched, bm = make(max_num_seqs=2, max_batch_tokens=64)
    seqs = [seq(f"s{i}", 4, max_tokens=3) for i in range(5)]
    for s in seqs:
        sched.add(s)
    out, _ = step(sched, bm)
    assert {c.seq.request_id for c in out.chunks} == {"s0", "s1"} and sched.num_waiting == 3
    run_to_end(sched, bm)
    assert all(s.output_token_ids == expected_output(s, 3) for s in seqs)


def test_waiting_sequence_is_admitted_only_when_its_chunk_fits_in_free_blocks():
    sched, bm = make(num_blocks=4, block_size=4, max_batch_tokens=64)
    sched.add(seq("big", 12, max_tokens=1))  # 3 blocks
    sched.add(seq("next", 8, max_tokens=1))  # 2 blocks: does not fit beside "big"
    out, _ = step(sched, bm)
    assert [c.seq.request_id for c in out.chunks] == ["big"] and sched.num_waiting == 1
    out, _ = step(sched, bm)  # "big" finished and freed its blocks
    assert [c.seq.request_id for c in out.chunks] == ["next"]


def test_preemption_when_blocks_run_out_then_recompute_to_identical_completion():
    sched, bm = make(num_blocks=6, block_size=4, max_batch_tokens=64)
    seqs = [seq(f"p{i}", 6, max_tokens=8) for i in range(3)]  # each grows to 13 tokens = 4 blocks
    for s in seqs:
        sched.add(s)
    outs = run_to_end(sched, bm)
    preempted = [p for o in outs for p in o.preempted]
    assert preempted, "a 6-block cache cannot hold three 4-block sequences without preemption"
    for s in seqs:
        assert s.finish_reason is FinishReason.LENGTH
        assert s.output_token_ids == expected_output(s, 8)
    assert bm.num_free == bm.num_total


def test_preempted_sequence_is_reset_and_first_in_line():
    sched, bm = make(num_blocks=4, block_size=4, max_batch_tokens=64)
    old, new = seq("old", 7, max_tokens=20), seq("new", 7, max_tokens=20)
    sched.add(old)
    sched.add(new)
    step(sched, bm)  # both prefilled: 2 blocks each, cache full
    out, _ = step(sched, bm)  # token 7 still fits in block 2; both now hold 9 tokens
    assert bm.num_free == 0 and not out.preempted
    out, _ = step(sched, bm)  # both need a 3rd block: the newest goes
    assert out.preempted == (new,)
    assert new.status is SequenceStatus.WAITING and new.num_computed_tokens == 0 and new.block_table == []
    assert sched._waiting[0] is new and new.num_tokens == 9  # keeps its sampled tokens for recompute
    assert [c.seq for c in out.chunks] == [old]


def test_abort_in_every_state_returns_free_blocks_to_start():
    sched, bm = make(num_blocks=8, block_size=4, max_batch_tokens=8)
    start = bm.num_free
    states = {}
    sched.add(fin := seq("finished", 3, max_tokens=1))
    step(sched, bm)
    assert fin.is_finished and fin.block_table == [] and sched.abort("finished") is None
    sched.add(dec := seq("decoding", 3, max_tokens=50))
    sched.add(mid := seq("mid-prefill", 20, max_tokens=5))
    step(sched, bm)
    states["decoding"], states["mid-prefill"] = dec, mid
    sched.add(wait := seq("waiting", 4))
    states["waiting"] = wait
    assert sched.reserve(aw := seq("awaiting", 5))
    states["awaiting-kv"] = aw
    assert (dec.status, mid.status, wait.status, aw.status) == (
        SequenceStatus.RUNNING, SequenceStatus.RUNNING, SequenceStatus.WAITING, SequenceStatus.AWAITING_KV)
    assert mid.num_computed_tokens < mid.num_prompt_tokens
    for name, s in states.items():
        assert sched.abort(s.request_id) is s, name
        assert sched.abort(s.request_id) is None, name
        assert s.is_finished and s.block_table == []
        bm.check_invariants()
    assert fin.finish_reason is FinishReason.LENGTH  # it had really finished: abort left it alone
    assert all(s.finish_reason is FinishReason.ABORT for s in states.values())
    assert bm.num_free == start and not sched.has_work() and sched.get("decoding") is None


def test_abort_after_preemption_frees_nothing_twice():
    sched, bm = make(num_blocks=4, block_size=4, max_batch_tokens=64)
    sched.add(seq("old", 7, max_tokens=20))
    sched.add(new := seq("new", 7, max_tokens=20))
    step(sched, bm)
    step(sched, bm)
    out, _ = step(sched, bm)
    assert out.preempted == (new,)
    assert sched.abort("new") is new and new.finish_reason is FinishReason.ABORT
    sched.abort("old")
    assert bm.num_free == bm.num_total
    bm.check_invariants()


def test_abort_between_schedule_and_postprocess_is_ignored_by_postprocess():
    sched, bm = make()
    sched.add(s := seq("a", 5, max_tokens=4))
    out = sched.schedule()
    sched.abort("a")
    assert sched.postprocess(out, {"a": (123,)}) == [] and s.num_tokens == 5
    assert bm.num_free == bm.num_total


def test_reserve_holds_blocks_without_scheduling_until_activate():
    sched, bm = make(num_blocks=16, block_size=4)
    s = seq("r", 10, max_tokens=3)
    assert sched.reserve(s)
    assert s.status is SequenceStatus.AWAITING_KV and len(s.block_table) == 3 and bm.num_free == 13
    assert sched.num_awaiting_kv == 1 and sched.stats().num_running == 1
    assert sched.schedule().is_empty and not sched.has_work()
    assert sched.activate("r", 777) is s
    assert s.status is SequenceStatus.RUNNING and s.num_computed_tokens == 10 and s.token_ids[-1] == 777
    out, _ = step(sched, bm)
    assert [(c.start, c.num_new_tokens, c.num_sampled) for c in out.chunks] == [(10, 1, 1)]
    run_to_end(sched, bm)
    assert s.output_token_ids == [777, fake_token("r", 11), fake_token("r", 12)]
    assert bm.num_free == 16


def test_reserve_without_room_allocates_nothing():
    sched, bm = make(num_blocks=4, block_size=4, max_num_seqs=2)
    with pytest.raises(SequenceRejected):  # 5 blocks > the whole cache: never, not "not now"
        sched.reserve(seq("huge", 17))
    assert sched.reserve(seq("a", 9))  # 3 blocks
    assert not sched.reserve(seq("b", 5))  # needs 2, 1 free
    assert bm.num_free == 1 and sched.get("b") is None
    assert sched.reserve(seq("c", 2))
    assert not sched.reserve(seq("d", 1))  # max_num_seqs reached (awaiting sequences count)
    assert bm.num_free == 0


def test_activate_applies_stop_rules_to_the_first_token():
    sched, bm = make()
    sched.reserve(one := seq("one", 5, max_tokens=1))
    sched.reserve(eos := seq("eos", 5, max_tokens=9))
    assert sched.activate("one", 300).finish_reason is FinishReason.LENGTH
    assert sched.activate("eos", EOS).finish_reason is FinishReason.STOP
    assert one.block_table == [] and eos.block_table == [] and bm.num_free == bm.num_total
    assert sched.num_running == 0
    with pytest.raises(SchedulerError):
        sched.activate("one", 1)


@pytest.mark.parametrize("sp, tokens, reason, n_out", [
    ({"max_tokens": 10}, [5, EOS, 6], FinishReason.STOP, 2),
    ({"max_tokens": 10, "ignore_eos": True}, [EOS] * 20, FinishReason.LENGTH, 10),
    ({"max_tokens": 10, "stop_token_ids": (42,)}, [5, 6, 42, 7], FinishReason.STOP, 3),
    ({"max_tokens": 10, "ignore_eos": True, "stop_token_ids": (EOS,)}, [5, EOS], FinishReason.STOP, 2),
    ({"max_tokens": 4}, [5] * 20, FinishReason.LENGTH, 4),
    ({"max_tokens": 100}, [5] * 200, FinishReason.LENGTH, 12),  # max_model_len 20 - 8 prompt tokens
])
def test_stop_rules(sp, tokens, reason, n_out):
    sched, bm = make(max_model_len=20)
    s = seq("s", 8, **sp)
    sched.add(s)
    run_to_end(sched, bm, model=lambda rid, pos: tokens[pos - 8])
    assert s.finish_reason is reason and s.num_output_tokens == n_out
    assert s.output_token_ids == tokens[:n_out] and bm.num_free == bm.num_total


def test_add_rejects_prompts_longer_than_context_or_cache_and_duplicate_ids():
    sched, _ = make(num_blocks=4, block_size=4, max_model_len=32)
    with pytest.raises(SequenceRejected):
        sched.add(seq("too-long-for-cache", 17))
    sched, _ = make(max_model_len=32)
    with pytest.raises(SequenceRejected):
        sched.add(seq("too-long", 33))
    sched.add(seq("dup", 3))
    with pytest.raises(SchedulerError):
        sched.add(seq("dup", 3))


def test_sequence_stops_at_cache_capacity_instead_of_starving():
    sched, bm = make(num_blocks=2, block_size=4, max_model_len=1024)
    s = seq("a", 3, max_tokens=100)
    sched.add(s)
    run_to_end(sched, bm)
    assert s.finish_reason is FinishReason.LENGTH and s.num_tokens == 8


def test_stats_count_queued_prefill_tokens_and_awaiting_sequences():
    sched, _ = make(max_batch_tokens=10)
    sched.add(seq("a", 25))
    sched.add(seq("b", 7))
    sched.reserve(seq("c", 4))
    sched.schedule()  # "a" gets 10 of 25 tokens scheduled; counts as computed only after postprocess
    st = sched.stats()
    assert (st.num_running, st.num_waiting) == (2, 1)  # "a" running + "c" awaiting; "b" waiting
    assert st.queued_prefill_tokens == 25 + 7


def test_stalled_prefill_resumes_when_a_newer_decoder_preempts_itself():
    sched, bm = make(num_blocks=4, block_size=4, max_batch_tokens=4)
    sched.add(a := seq("a", 12, max_tokens=1))
    step(sched, bm)  # "a" holds 1 block, 8 prompt tokens to go
    assert sched.reserve(b := seq("b", 8, max_tokens=50))
    sched.activate("b", fake_token("b", 8))
    out, _ = step(sched, bm)  # "b" takes the last free block; "a" cannot grow and is skipped
    assert [c.seq for c in out.chunks] == [b] and bm.num_free == 0
    outs = run_to_end(sched, bm)
    resumed = next(o for o in outs if any(c.seq is a for c in o.chunks))
    assert resumed.preempted == (b,)  # "b" needed a 4th block and, as the newest, gave way
    assert a.output_token_ids == expected_output(a, 1)
    assert b.finish_reason is FinishReason.LENGTH and b.num_tokens == sched.max_len == 16
    assert b.output_token_ids == expected_output(b, 8)
    assert bm.num_free == bm.num_total


@pytest.mark.parametrize("seed", [7, 8, 9])
def test_random_workload_with_preemption_and_aborts_keeps_invariants_and_outputs(seed):
    rng = random.Random(seed)
    sched, bm = make(num_blocks=8, block_size=4, max_batch_tokens=12, max_num_seqs=4)
    pending = [seq(f"q{i}", rng.randint(1, 16), max_tokens=rng.randint(1, 16)) for i in range(30)]
    done, aborted, num_preempted = [], set(), 0
    for _ in range(3000):
        if pending and rng.random() < 0.3:
            sched.add(pending.pop())
        if sched._running and rng.random() < 0.03:
            victim = rng.choice(sched._running)
            aborted.add(victim.request_id)
            sched.abort(victim.request_id)
        if not sched.has_work() and not pending:
            break
        out, finished = step(sched, bm)
        done += finished
        num_preempted += len(out.preempted)
    assert not pending and not sched.has_work()
    assert num_preempted > 0 and aborted
    assert len(done) + len(aborted) == 30
    for s in done:
        n_out = min(s.sampling.max_tokens, sched.max_len - s.num_prompt_tokens)
        assert s.output_token_ids == expected_output(s, n_out)
    assert bm.num_free == bm.num_total
