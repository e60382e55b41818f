"""The batched accept and drafting over slot-resident head KV (HeadDraftGraphs, eager on CPU) keep each
sequence's head KV, last output and drafts equal to its own per-sequence HeadDrafter's, through steps
of different acceptance, aborts and new arrivals; sampled drafts over a slot keep their seeded draws."""
from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from contracts.sampling import SamplingParams
from engine.config import ModelConfig
from engine.spec.draft_head import DEFAULT_HEAD_PATH, DraftHead, DraftHeadConfig
from engine.spec.head_drafter import HeadDrafter
from engine.spec.head_graphs import HeadDraftGraphs, context_spans
from engine.spec.head_slots import SlotHeadDrafter

TARGET = ModelConfig(name="t", vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=4,
                     num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=128)
LAYERS = (1, 2, 3)
FEATURES = len(LAYERS) * TARGET.hidden_size


def head_and_embed(device: str | torch.device = "cpu") -> tuple[DraftHead, nn.Embedding]:
    torch.manual_seed(0)
    head = DraftHead(DraftHeadConfig.for_target(TARGET, LAYERS, draft_vocab_size=64))
    for p in head.parameters():
        nn.init.normal_(p, std=0.3)  # away from argmax ties between the batched and per-sequence math
    head.d2t = torch.randperm(TARGET.vocab_size)[:64]
    embed = nn.Embedding(TARGET.vocab_size, TARGET.hidden_size)
    nn.init.normal_(embed.weight, std=1.0)
    return head.eval().to(device), embed.to(device)


@contextlib.contextmanager
def no_host_sync(device: torch.device) -> Iterator[None]:
    """On CUDA, any synchronizing call inside raises (the batched accept must not wait for the GPU)."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


class _Pair:
    """One sequence drafted twice: by a slot drafter of the graphs and by its own HeadDrafter."""

    def __init__(self, graphs: HeadDraftGraphs, rng: random.Random, sampling: SamplingParams | None) -> None:
        device = graphs.slots.device
        first, tokens = rng.randrange(0, 3), rng.randrange(4, 14)
        self.ids = [rng.randrange(TARGET.vocab_size) for _ in range(tokens)]
        features = torch.randn(tokens - 1 - first, FEATURES, device=device)
        slot = graphs.new_drafter(first, sampling)
        assert slot is not None
        self.slot: SlotHeadDrafter = slot
        self.ref = HeadDrafter(graphs.head, graphs.embed, first_position=first, sampling=sampling)
        self.slot.accept(self.ids, features)  # a prompt: the eager one-sequence path into the slot
        self.ref.accept(self.ids, features)

    def check(self) -> None:
        assert self.slot.num_committed == self.ref.num_committed
        slot, ref = self.slot, self.ref
        tol = 1e-4 if on_cuda(slot) else 1e-5  # CUDA: other GEMM tiles and attention splits per shape
        for got, want in ((slot.k, ref.k), (slot.v, ref.v), (slot.last, ref.last)):
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def on_cuda(drafter: SlotHeadDrafter) -> bool:
    return drafter.slots.device.type == "cuda"


def run_scenario(device: str | torch.device, capture: bool, steps: int = 10, k: int = 4) -> int:
    """Random steps over up to 4 sequences; returns how many batched accepts ran (each one call)."""
    head, embed = head_and_embed(device)
    # Spans 8, 32, 112: the sequences grow from one into the next on the way.
    graphs = HeadDraftGraphs(head, embed, max_num_seqs=4, max_len=96, k=k, first_span=8)
    if capture:
        graphs.capture_all()
    rng = random.Random(0)
    sampled = SamplingParams(temperature=0.8, top_k=20, seed=11)
    live = [_Pair(graphs, rng, None), _Pair(graphs, rng, sampled), _Pair(graphs, rng, None)]
    batched = 0
    with torch.no_grad():
        for step in range(steps):
            if step % 3 == 1:  # an abort, then (below) a new arrival takes the lowest free slot
                gone = live.pop(rng.randrange(len(live)))
                gone.slot.release()
            while len(live) < 4 and rng.random() < 0.6:
                live.append(_Pair(graphs, rng, None if rng.random() < 0.7 else sampled))
            # The step's feature rows: each sequence's accepted rows at scattered places among others; a
            # sequence sitting a step out (0 rows) keeps its slot's rows and last output through the call.
            accepted = {id(p): 0 if rng.random() < 0.2 else rng.randrange(1, k + 2) for p in live}
            total = sum(accepted.values()) + 5
            features = torch.randn(total, FEATURES, device=device)
            free = list(range(total))
            rng.shuffle(free)
            items = []
            for p in live:
                n = accepted[id(p)]
                if not n:
                    continue
                rows = sorted(free[:n])
                free = free[n:]
                p.ids += [rng.randrange(TARGET.vocab_size) for _ in range(n)]
                items.append((p.slot, p.ids, rows))
                p.ref.accept(p.ids, features[rows])
            with no_host_sync(graphs.slots.device):
                graphs.accept(items, features)
            batched += 1
            for p in live:
                p.check()
            greedy = [p for p in live if p.slot.sampling is None]
            if greedy:  # as many drafts as the batch's longest ask (adaptive k): 1 .. k
                steps = rng.randrange(1, k + 1)
                got = graphs.propose([p.slot for p in greedy], steps)
                assert got == [p.ref.propose(steps) for p in greedy]
            for p in live:
                p.check()  # drafting wrote only past the accepted rows
                if p.slot.sampling is not None:  # over the slot's views: the same seeded draws
                    assert p.slot.propose(k) == p.ref.propose(k)
                    torch.testing.assert_close(p.slot.draft_probs, p.ref.draft_probs, rtol=1e-4, atol=1e-5)
    if not capture:  # on CPU the buckets and spans are built as the calls need them
        assert len({span for _, span in graphs._accepts}) >= 2
    return batched


def test_batched_accept_and_drafts_equal_each_sequences_own_drafter() -> None:
    assert run_scenario("cpu", capture=False) == 10


def test_slots_are_handed_out_lowest_first_and_given_back() -> None:
    head, embed = head_and_embed()
    graphs = HeadDraftGraphs(head, embed, max_num_seqs=2, max_len=16, k=2)
    a, b = graphs.new_drafter(0, None), graphs.new_drafter(3, None)
    assert (a.slot, b.slot, graphs.slots.in_use) == (0, 1, 2)
    assert graphs.new_drafter(0, None) is None  # all taken: the speculator drafts unbatched
    a.release()
    assert graphs.slots.in_use == 2
    c = graphs.new_drafter(1, None)
    assert c.slot == 0 and c.length == 0 and c.k is None and c.last is None and c.num_committed == 1
    b.release()
    assert graphs.slots.in_use == 1


def test_what_the_graphs_take_and_serve() -> None:
    head, embed = head_and_embed()
    graphs = HeadDraftGraphs(head, embed, max_num_seqs=2, max_len=16, k=2)
    greedy, sampled = graphs.new_drafter(0, None), graphs.new_drafter(0, SamplingParams(temperature=0.7))
    assert not graphs.serves(greedy)  # nothing accepted yet: no last output
    ids = list(range(6))
    greedy.accept(ids, torch.randn(5, FEATURES))
    sampled.accept(ids, torch.randn(5, FEATURES))
    assert graphs.serves(greedy) and not graphs.serves(sampled)
    assert graphs.batches(greedy, 5, 3) and graphs.batches(sampled, 5, 1)
    assert not graphs.batches(greedy, 4, 3)  # not where the drafter stands
    assert not graphs.batches(greedy, 5, 4)  # wider than k + 1: the eager path
    plain = HeadDrafter(head, embed)
    assert not graphs.batches(plain, 0, 1) and not graphs.serves(plain)
    with pytest.raises(ValueError):
        greedy.accept(ids + [1] * 20, torch.randn(20, FEATURES))  # past max_len


def test_context_spans_grow_by_four_up_to_the_capacity() -> None:
    assert context_spans(8208, 256) == (256, 1024, 4096, 8208)
    assert context_spans(112, 16) == (16, 64, 112)
    assert context_spans(256, 256) == (256,)


def test_the_shipped_heads_grouped_attention_matches_too() -> None:
    """The embedded model's head (9 query heads over 3 KV heads: groups of 3) through a batched accept and
    drafting, against per-sequence drafters."""
    head = DraftHead.load(DEFAULT_HEAD_PATH)
    c = head.config
    torch.manual_seed(0)
    embed = nn.Embedding(c.target_vocab_size, c.hidden_size)
    graphs = HeadDraftGraphs(head, embed, max_num_seqs=2, max_len=64, k=3)
    width = len(c.feature_layers) * c.hidden_size
    pairs = []
    for first, tokens in ((0, 9), (2, 14)):
        ids = torch.randint(0, c.target_vocab_size, (tokens,)).tolist()
        features = torch.randn(tokens - 1 - first, width)
        slot, ref = graphs.new_drafter(first, None), HeadDrafter(head, embed, first_position=first)
        slot.accept(ids, features)
        ref.accept(ids, features)
        pairs.append((slot, ref, ids))
    with torch.no_grad():
        features = torch.randn(7, width)
        items = []
        for (slot, ref, ids), rows in zip(pairs, ([0, 1, 2], [4, 5, 6, 3]), strict=True):
            ids += torch.randint(0, c.target_vocab_size, (len(rows),)).tolist()
            ref.accept(ids, features[rows])
            items.append((slot, ids, rows))
        graphs.accept(items, features)
        assert graphs.propose([s for s, _, _ in pairs]) == [r.propose(3) for _, r, _ in pairs]
    for slot, ref, _ in pairs:  # trained weights: outputs up to ~50, so fp32 rounding passes 1e-5
        for got, want in ((slot.k, ref.k), (slot.v, ref.v), (slot.last, ref.last)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
