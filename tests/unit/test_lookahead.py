"""Decode lookahead bookkeeping on CPU: which launched rows serve a step, when a step can be launched ahead,
and the scheduler keeping a block ready for it."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from contracts.sampling import SamplingParams
from engine.block_manager import BlockManager
from engine.executor import SampledStep
from engine.executors.lookahead import DecodeLookahead, matching_rows
from engine.scheduler import ScheduledChunk, Scheduler, SchedulerConfig, SchedulerOutput
from engine.sequence import Sequence
from tests.tiny_model import tiny_preset_engine

BLOCK = 4


def decoding(rid: str, num_tokens: int, blocks: int) -> Sequence:
    seq = Sequence(rid, list(range(num_tokens)), SamplingParams(), block_table=list(range(blocks)))
    seq.num_computed_tokens = num_tokens - 1
    return seq


def chunk(seq: Sequence, start: int | None = None) -> ScheduledChunk:
    return ScheduledChunk(seq, seq.num_computed_tokens if start is None else start, 1, 1)


def test_rows_serve_the_same_step_or_that_step_minus_some_sequences() -> None:
    a, b, c = (decoding(r, 5, 2) for r in "abc")
    launched = [chunk(a), chunk(b), chunk(c)]
    assert matching_rows(launched, [chunk(a), chunk(b), chunk(c)]) == [0, 1, 2]
    assert matching_rows(launched, [chunk(a), chunk(c)]) == [0, 2]  # b finished or was aborted
    assert matching_rows(launched, [chunk(c), chunk(a)]) is None  # another order
    assert matching_rows(launched, [chunk(a), chunk(b, start=3)]) is None  # another position (preempted)
    d = decoding("d", 5, 2)
    assert matching_rows(launched, [chunk(a), chunk(d)]) is None  # a newcomer
    verify = ScheduledChunk(a, a.num_computed_tokens, 2, 2, (9,))
    assert matching_rows(launched, [verify]) is None  # a verify step is never launched ahead


def lookahead_over(graphs: FakeGraphs) -> DecodeLookahead:
    return DecodeLookahead(SimpleNamespace(graphs=graphs))  # what it reads of the graphed executor


class FakeGraphs:
    """What DecodeLookahead reads of DecodeGraphRunner; `run` records the staged chunks and token ids."""

    def __init__(self) -> None:
        self.kv_cache = type("KV", (), {"block_size": BLOCK})()
        self.max_model_len = 64
        self.table_width = 16
        self.runs: list[tuple[tuple[ScheduledChunk, ...], torch.Tensor | None]] = []

    def fits(self, chunks) -> bool:
        return len(chunks) <= 8

    def run(self, chunks, token_ids=None):
        self.runs.append((tuple(chunks), token_ids))
        logits = torch.zeros(len(chunks), 10)
        logits[:, 3] = 1.0  # greedy picks 3
        return torch.zeros(len(chunks), 2), logits


def step_for(seqs: list[Sequence]) -> SampledStep:
    return SampledStep(torch.tensor([7] * len(seqs)), tuple(seqs), torch.zeros(len(seqs), 2))


def test_launch_stages_the_next_positions_fed_by_the_device_tokens_and_claim_returns_them() -> None:
    graphs = FakeGraphs()
    ahead = lookahead_over(graphs)
    a, b = decoding("a", 5, 2), decoding("b", 6, 2)  # positions 4 and 5; blocks hold 8 tokens
    step = step_for([a, b])
    assert ahead.launch_next([chunk(a), chunk(b)], step)
    staged, ids = graphs.runs[-1]
    assert [(c.seq.request_id, c.start) for c in staged] == [("a", 5), ("b", 6)]
    assert ids is step.token_ids
    # The scheduler's next step, once the hosts saw the tokens, asks for exactly that (b finished here).
    a.token_ids.append(7)
    a.num_computed_tokens = 5
    claimed = ahead.claim(SchedulerOutput((chunk(a),), ()))
    assert claimed is not None and claimed.seqs == (a,) and claimed.token_ids.tolist() == [3]
    assert (ahead.launched, ahead.used, ahead.dropped) == (1, 1, 0)
    assert ahead.claim(SchedulerOutput((chunk(a),), ())) is None  # nothing in flight any more


def test_no_launch_without_a_slot_for_the_next_position_and_stale_results_are_dropped() -> None:
    graphs = FakeGraphs()
    ahead = lookahead_over(graphs)
    full = decoding("full", 8, 2)  # position 7 is the last slot of its 2 blocks
    assert not ahead.launch_next([chunk(full)], step_for([full]))
    a = decoding("a", 5, 2)
    assert ahead.launch_next([chunk(a)], step_for([a]))
    newcomer = decoding("n", 3, 1)
    assert ahead.claim(SchedulerOutput((chunk(newcomer),), ())) is None
    assert (ahead.launched, ahead.used, ahead.dropped) == (1, 0, 1)


def test_scheduler_keeps_a_block_ready_for_the_lookahead_only_when_free() -> None:
    config = SchedulerConfig(max_batch_tokens=16, max_num_seqs=4, block_size=BLOCK, max_model_len=64,
                             lookahead_tokens=1)
    scheduler = Scheduler(config, BlockManager(3, BLOCK))
    seq = Sequence("s", [1, 2, 3], SamplingParams(max_tokens=20, ignore_eos=True))
    assert scheduler.reserve(seq)
    scheduler.activate("s", 9)  # 4 tokens: one full block; decoding position 3 needs no new block
    out = scheduler.schedule()
    assert out.chunks[0].start == 3
    assert len(seq.block_table) == 2  # one more for position 4, which the lookahead step writes
    other = Sequence("o", [1] * 4, SamplingParams(max_tokens=20, ignore_eos=True))
    assert scheduler.reserve(other)  # takes the last free block
    scheduler.postprocess(out, {"s": (5,)})
    for _ in range(3):
        out = scheduler.schedule()
        scheduler.postprocess(out, {"s": (5,)})
    # Position 7 is the last slot: the lookahead block is not free, and nobody is preempted for it.
    assert len(seq.block_table) == 2 and scheduler.get("o") is not None


def test_schedule_restricted_to_the_launched_batch_defers_everyone_else_one_step() -> None:
    config = SchedulerConfig(max_batch_tokens=64, max_num_seqs=4, block_size=BLOCK, max_model_len=64)
    scheduler = Scheduler(config, BlockManager(16, BLOCK))
    a, b = (Sequence(r, [1, 2, 3], SamplingParams(max_tokens=9, ignore_eos=True)) for r in "ab")
    for seq in (a, b):
        assert scheduler.reserve(seq)
        scheduler.activate(seq.request_id, 4)
    waiting = Sequence("w", [5, 6], SamplingParams(max_tokens=9, ignore_eos=True))
    scheduler.add(waiting)
    out = scheduler.schedule(decode_only=[a])
    assert [c.seq.request_id for c in out.chunks] == ["a"] and out.others_waiting
    assert scheduler.num_waiting == 1  # not admitted in a restricted step
    scheduler.postprocess(out, {"a": (7,)})
    out = scheduler.schedule()  # unrestricted: b decodes, w prefills, a decodes
    assert sorted(c.seq.request_id for c in out.chunks) == ["a", "b", "w"]


def test_engine_drops_a_launched_step_whose_sequences_are_all_gone_and_schedules_the_rest() -> None:
    # The last step of a drained engine still launches one ahead; new work must not wait behind it.
    engine = tiny_preset_engine()
    gone = Sequence("gone", [1, 2], SamplingParams(max_tokens=1))

    class Pending:
        dropped = 0

        def pending_seqs(self) -> tuple | None:
            return None if self.dropped else (gone,)

        def drop(self) -> None:
            self.dropped += 1

    engine.lookahead = Pending()
    engine.add_request("new", [3, 4, 5], SamplingParams(max_tokens=2))
    out = engine.schedule()
    assert [c.seq.request_id for c in out.chunks] == ["new"] and engine.lookahead.dropped == 1
