"""Verify chunks that carry draft distributions are rejection-sampled by the executor (tiny random model)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from contracts.sampling import SamplingParams
from engine.executors.batch_inputs import SamplingRows
from engine.executors.verify_sampling import sample_rows
from engine.llm_engine import LLMEngine
from engine.sampler import sample
from engine.scheduler_types import ScheduledChunk, SchedulerOutput
from engine.sequence import Sequence
from engine.spec.rejection import rejection_verify
from tests.tiny_model import tiny_preset_engine

pytestmark = pytest.mark.timeout(120)

PROMPT = [5, 17, 300, 42, 9, 77, 128]
OTHER = [11, 12, 13, 14]


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return tiny_preset_engine()


def with_draft_probs(batch: SchedulerOutput, seq: Sequence, probs: torch.Tensor) -> SchedulerOutput:
    chunks = tuple(dataclasses.replace(c, draft_probs=probs) if c.seq is seq else c for c in batch.chunks)
    return dataclasses.replace(batch, chunks=chunks)


def finish(engine: LLMEngine) -> None:
    while engine.has_work():
        engine.step()
    assert engine.block_manager.num_free == engine.block_manager.num_total


def test_greedy_verify_with_draft_probs_still_gives_greedy_decoding(engine: LLMEngine) -> None:
    greedy = SamplingParams(max_tokens=10, ignore_eos=True)
    (reference,) = engine.generate([PROMPT], greedy)
    seq = engine.add_request("greedy", PROMPT, greedy)
    engine.step()
    vocab = engine.model_config.vocab_size
    wrong = (reference[3] + 1) % vocab
    seq.draft_token_ids = [reference[1], reference[2], wrong]
    probs = torch.softmax(torch.randn(3, vocab, generator=torch.Generator().manual_seed(0)), -1)
    batch = with_draft_probs(engine.schedule(), seq, probs)
    out = engine.execute(batch)
    assert out.sampled[seq.request_id] == (reference[1], reference[2], reference[3], -1)
    engine.postprocess(batch, out)
    assert seq.output_token_ids == reference[:4]
    finish(engine)
    assert seq.output_token_ids == reference


def test_a_sampled_verify_beside_a_plain_request_is_rejection_sampled_over_its_own_rows(
        engine: LLMEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    sampled = SamplingParams(max_tokens=8, ignore_eos=True, temperature=1.0, seed=3)
    plain = SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.7, seed=4)
    (plain_reference,) = engine.generate([OTHER], plain)
    other = engine.add_request("plain", OTHER, plain)
    seq = engine.add_request("verify", PROMPT, sampled)
    engine.step()
    vocab = engine.model_config.vocab_size
    drafts = [7, 8, 9]
    seq.draft_token_ids = list(drafts)
    probs = torch.softmax(4 * torch.randn(3, vocab, generator=torch.Generator().manual_seed(1)), -1)
    batch = with_draft_probs(engine.schedule(), seq, probs)
    chunk_of = {c.seq.request_id: c for c in batch.chunks}
    assert [c.num_sampled for c in batch.chunks] == [1, 4]  # the plain decode first (older), then the verify

    captured: list[torch.Tensor] = []
    compute_logits = engine.model.compute_logits
    monkeypatch.setattr(engine.model, "compute_logits",
                        lambda hidden: captured.append(compute_logits(hidden)) or captured[-1])
    out = engine.execute(batch)
    expected = rejection_verify(captured[0][1:5].unsqueeze(0), [sampled], [chunk_of["verify"].output_start],
                                torch.tensor([drafts]), probs.unsqueeze(0), torch.tensor([3]))
    assert out.sampled["verify"] == tuple(expected.token_ids[0].tolist())
    assert out.sampled["plain"] == (plain_reference[1],)

    accepted = int(expected.num_accepted[0])
    first = seq.output_token_ids[0]
    engine.postprocess(batch, out)
    assert seq.output_token_ids == [first, *drafts[:accepted], int(expected.token_ids[0, accepted])]
    assert seq.num_computed_tokens == len(PROMPT) + 1 + accepted  # the rejected positions rolled back
    finish(engine)
    assert other.output_token_ids == plain_reference


def test_verify_chunks_of_different_lengths_are_padded_and_written_back_to_their_rows() -> None:
    vocab = 40
    gen = torch.Generator().manual_seed(9)
    params = [SamplingParams(temperature=1.0, seed=s) for s in (1, 2, 3)]
    seqs = [Sequence(f"r{i}", list(range(10 + i)), p) for i, p in enumerate(params)]
    q2 = torch.softmax(torch.randn(2, vocab, generator=gen), -1)
    q4 = torch.softmax(torch.randn(4, vocab, generator=gen), -1)
    chunks = [ScheduledChunk(seqs[0], 9, 3, 3, (4, 5), q2),  # k = 2
              ScheduledChunk(seqs[1], 10, 1, 1),  # a plain decode row between them
              ScheduledChunk(seqs[2], 11, 5, 5, (6, 7, 8, 9), q4)]  # k = 4
    rows = SamplingRows.of(chunks)
    logits = torch.randn(9, vocab, generator=gen)
    got = sample_rows(logits, rows).tolist()
    first = rejection_verify(logits[0:3].unsqueeze(0), params[:1], [10], torch.tensor([[4, 5]]),
                             q2.unsqueeze(0), torch.tensor([2]))
    last = rejection_verify(logits[4:9].unsqueeze(0), params[2:], [12], torch.tensor([[6, 7, 8, 9]]),
                            q4.unsqueeze(0), torch.tensor([4]))
    assert got[0:3] == first.token_ids[0].tolist()
    assert got[3] == sample(logits[3:4], params[1:2], [11]).item()
    assert got[4:9] == last.token_ids[0].tolist()
