"""Several tokens per sequence per step: verify positions in the budget, acceptance, rollback, blocks."""
from __future__ import annotations

import pytest

from contracts.sampling import FinishReason, SamplingParams
from engine.block_manager import BlockManager
from engine.scheduler import Scheduler, SchedulerConfig, SchedulerError
from engine.sequence import Sequence

pytestmark = pytest.mark.timeout(60)

BLOCK = 4


def make(num_blocks: int = 32, max_batch_tokens: int = 32, max_model_len: int = 1024) -> Scheduler:
    config = SchedulerConfig(max_batch_tokens=max_batch_tokens, max_num_seqs=8, block_size=BLOCK,
                             max_model_len=max_model_len, eos_token_ids=(2,))
    return Scheduler(config, BlockManager(num_blocks, BLOCK))


def decoding(sched: Scheduler, rid: str, prompt_len: int, max_tokens: int = 50) -> Sequence:
    """A sequence whose prompt KV is in place (as after a transfer) and whose first token is sampled."""
    seq = Sequence(rid, [10 + i for i in range(prompt_len)], SamplingParams(max_tokens=max_tokens))
    assert sched.reserve(seq)
    sched.activate(rid, 99)
    return seq


def test_verify_step_schedules_the_last_token_and_the_drafts_with_blocks_for_them():
    sched = make()
    s = decoding(sched, "s", 6)  # 7 tokens, 6 computed: blocks for 7 tokens = 2
    s.draft_token_ids = [41, 42, 43]
    out = sched.schedule()
    (chunk,) = out.chunks
    assert (chunk.start, chunk.num_new_tokens, chunk.num_sampled) == (6, 4, 4)
    assert chunk.draft_token_ids == (41, 42, 43) and chunk.token_ids == [99, 41, 42, 43]
    assert out.num_batched_tokens == 4
    assert len(s.block_table) == 3  # positions 6..9: 10 tokens need 3 blocks
    assert sched.blocks.num_free == 32 - 3


def test_budget_counts_verify_tokens_and_trims_drafts_to_fit_then_prefill_takes_the_rest():
    sched = make(max_batch_tokens=8)
    a = decoding(sched, "a", 5)
    b = decoding(sched, "b", 5)
    a.draft_token_ids = [1, 1, 1, 1, 1, 1]  # 7 tokens of the 8
    b.draft_token_ids = [3, 3]  # only its last token fits: no verify positions
    sched.add(Sequence("p", list(range(20)), SamplingParams()))
    out = sched.schedule()
    got = [(c.seq.request_id, c.num_new_tokens, c.num_sampled, len(c.draft_token_ids)) for c in out.chunks]
    assert got == [("a", 7, 7, 6), ("b", 1, 1, 0)]
    assert out.num_batched_tokens == 8 and out.others_waiting

    sched = make(max_batch_tokens=8)
    a = decoding(sched, "a", 5)
    a.draft_token_ids = [1, 1]
    sched.add(Sequence("p", list(range(20)), SamplingParams()))
    out = sched.schedule()  # 3 verify tokens, then a 5-token prefill chunk that samples nothing
    got = [(c.seq.request_id, c.num_new_tokens, c.num_sampled) for c in out.chunks]
    assert got == [("a", 3, 3), ("p", 5, 0)]


def test_drafts_never_run_past_the_context_window():
    sched = make(max_model_len=9)
    s = decoding(sched, "s", 6)  # 7 tokens: positions 7 and 8 are the last two of the window
    s.draft_token_ids = [5, 6, 7, 8]
    (chunk,) = sched.schedule().chunks
    assert chunk.draft_token_ids == (5, 6) and chunk.num_new_tokens == 3


def test_all_drafts_accepted_appends_them_and_the_bonus_token():
    sched = make()
    s = decoding(sched, "s", 6)
    s.draft_token_ids = [41, 42, 43]
    out = sched.schedule()
    assert sched.postprocess(out, {"s": (41, 42, 43, 44)}) == []
    assert s.output_token_ids == [99, 41, 42, 43, 44] and s.num_computed_tokens == 10
    assert s.draft_token_ids == [] and len(s.block_table) == 3  # 11 tokens: 3 blocks hold them


def test_rejected_drafts_roll_back_and_return_exactly_the_surplus_blocks():
    sched = make()
    s = decoding(sched, "s", 6)  # positions 6..12 verified: 13 tokens' worth = 4 blocks
    s.draft_token_ids = [41, 42, 43, 44, 45, 46]
    out = sched.schedule()
    assert len(s.block_table) == 4 and sched.blocks.num_free == 28
    kept = s.block_table[:3]
    sched.postprocess(out, {"s": (41, 50, 51, 52, 53, 54, 55)})  # draft 1 stands, draft 2 does not
    assert s.output_token_ids == [99, 41, 50]  # the model's own token where the draft was wrong
    assert s.num_computed_tokens == 8  # positions 0..7 (6 prompt, 99, 41) keep their KV
    assert s.block_table == kept and sched.blocks.num_free == 29  # 9 tokens need 3 of the 4 blocks
    sched.blocks.check_invariants()


def test_rollback_resets_computed_tokens_and_never_frees_a_block_the_tokens_need():
    sched = make()
    s = decoding(sched, "s", 9)  # 10 tokens, 9 computed, 3 blocks
    assert len(s.block_table) == 3
    sched.rollback("s", 4)
    assert s.num_computed_tokens == 4 and len(s.block_table) == 3  # tokens 4..9 are recomputed in place
    out = sched.schedule()
    (chunk,) = out.chunks
    assert (chunk.start, chunk.num_new_tokens, chunk.num_sampled) == (4, 6, 1)
    with pytest.raises(SchedulerError):
        sched.rollback(s, 11)  # only backwards
    with pytest.raises(SchedulerError):
        sched.rollback("nobody", 0)


def test_a_stop_token_among_accepted_drafts_finishes_and_frees_every_block():
    sched = make()
    s = decoding(sched, "s", 6)
    s.draft_token_ids = [41, 2, 43]  # 2 is EOS
    out = sched.schedule()
    assert sched.postprocess(out, {"s": (41, 2, 43, 44)}) == [s]
    assert s.output_token_ids == [99, 41, 2] and s.finish_reason is FinishReason.STOP
    assert s.block_table == [] and sched.blocks.num_free == 32


def test_abort_mid_verify_frees_every_block_exactly_once():
    sched = make()
    s = decoding(sched, "s", 6)
    decoding(sched, "o", 3)
    s.draft_token_ids = [41, 42, 43, 44, 45, 46, 47, 48]
    out = sched.schedule()
    assert len(s.block_table) == 4
    assert sched.abort("s") is s
    assert sched.postprocess(out, {"s": tuple(range(9)), "o": (7,)}) == []  # s is skipped
    assert s.block_table == [] and s.num_tokens == 7
    sched.abort("o")
    assert sched.blocks.num_free == 32
    sched.blocks.check_invariants()


def test_verify_chunk_needs_one_sampled_token_per_position():
    sched = make()
    s = decoding(sched, "s", 6)
    s.draft_token_ids = [41]
    out = sched.schedule()
    with pytest.raises(SchedulerError):
        sched.postprocess(out, {"s": (41,)})
