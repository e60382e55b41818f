"""Draft head: shapes, vocab map, drafting equals the training unroll, a step lowers loss, save/resume."""
from __future__ import annotations

import pytest
import torch

from contracts.sampling import SamplingParams
from engine.random_models import preset_config
from engine.spec.draft_head import (
    DraftHead,
    DraftHeadConfig,
    build_vocab_map,
    target_to_draft,
    train_attention_mask,
)
from engine.spec.head_drafter import HeadDrafter
from engine.spec.ttt import Batch, ttt_loss

pytestmark = pytest.mark.timeout(60)

TARGET = preset_config("random:tiny")  # hidden 64, 4/2 heads, vocab 512
LAYERS = (1, 1, 0)
DRAFT_VOCAB = 128


def make_head(seed: int = 0) -> DraftHead:
    torch.manual_seed(seed)
    head = DraftHead(DraftHeadConfig.for_target(TARGET, LAYERS, DRAFT_VOCAB))
    counts = torch.randint(0, 50, (TARGET.vocab_size,), generator=torch.Generator().manual_seed(seed))
    head.d2t.copy_(build_vocab_map(counts, DRAFT_VOCAB))
    return head


def make_batch(seed: int = 0, batch: int = 2,
               length: int = 12) -> tuple[Batch, torch.Tensor, torch.nn.Embedding]:
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(TARGET.vocab_size, TARGET.hidden_size, generator=gen)
    embed = torch.nn.Embedding.from_pretrained(table)
    ids = torch.randint(0, TARGET.vocab_size, (batch, length), generator=gen)
    features = torch.randn(batch, length, len(LAYERS) * TARGET.hidden_size, generator=gen)
    labels = torch.randint(0, DRAFT_VOCAB, (batch, length), generator=gen)
    labels[:, :3] = -1  # a prompt: no loss there
    with torch.no_grad():
        return Batch(embed(ids), features, labels), ids, embed


def test_vocab_map_ranks_by_frequency_and_round_trips() -> None:
    counts = torch.tensor([5, 0, 9, 5, 1])
    d2t = build_vocab_map(counts, 3)
    assert d2t.tolist() == [2, 0, 3]  # most frequent first, ties to the lower id
    t2d = target_to_draft(d2t, 5)
    assert t2d[d2t].tolist() == [0, 1, 2]
    assert t2d.tolist() == [1, -1, 0, 2, -1]


def test_config_json_round_trip() -> None:
    config = DraftHeadConfig.for_target(TARGET, LAYERS, DRAFT_VOCAB)
    assert DraftHeadConfig.from_json(config.to_json()) == config


def test_forward_shapes() -> None:
    head = make_head()
    batch, _, _ = make_batch()
    g = head.fuse(batch.features)
    assert g.shape == (2, 12, TARGET.hidden_size)
    q, k, v = head.qkv(batch.emb, g, torch.arange(12))
    assert q.shape == (2, TARGET.num_heads, 12, TARGET.head_dim)
    assert k.shape == v.shape == (2, TARGET.num_kv_heads, 12, TARGET.head_dim)
    a = head.finish(g, q, k, v, torch.ones(12, 12, dtype=torch.bool).tril())
    assert head.logits(a).shape == (2, 12, DRAFT_VOCAB)
    loss, stats = ttt_loss(head, batch, steps=3)
    assert loss.ndim == 0 and len(stats) == 3
    # Labels sit at positions 3..11; row t of step j predicts position t + 2 + j, rows t < 11.
    assert [n for _, n in stats] == [9 * 2, 9 * 2, 8 * 2]


def test_drafting_reproduces_the_training_unroll() -> None:
    """HeadDrafter (KV cache, one row at a time) predicts what ttt_loss's rows predict for the same inputs."""
    head = make_head().eval()
    batch, ids, embed = make_batch(batch=1, length=10)
    length, t = 9, 4
    with torch.no_grad():
        g = head.fuse(batch.features[:, :length])
        unrolled = []
        keys, values = [], []
        for step in range(3):
            emb = embed(ids[:, 1 + step:1 + step + length])
            emb = torch.cat([emb, torch.zeros(1, length - emb.shape[1], TARGET.hidden_size)], dim=1)
            q, k, v = head.qkv(emb, g, torch.arange(length) + step)
            keys.append(k)
            values.append(v)
            mask = train_attention_mask(length, step)
            g = head.finish(g, q, torch.cat(keys, 2), torch.cat(values, 2), mask)
            unrolled.append(g[0, t])
    drafter = HeadDrafter(head, embed)
    # Accept positions 0..t (their next tokens ids[1..t+1]): the head's last output is unrolled step 0 at t.
    drafter.accept(ids[0, :t + 2].tolist(), batch.features[0, :t + 1])
    torch.testing.assert_close(drafter.last[0, 0], unrolled[0])
    # Drafting step 2 feeds the token at t + 2; the unroll fed the true token, so force the same one.
    head.d2t.copy_(torch.arange(DRAFT_VOCAB))
    a, _, _ = drafter._run([int(ids[0, t + 2])], drafter.last, t + 1, drafter.k, drafter.v)
    torch.testing.assert_close(a[0, -1], unrolled[1])
    drafts = drafter.propose(4)
    assert len(drafts) == 4 and all(0 <= d < DRAFT_VOCAB for d in drafts)


def test_draft_vocab_limit_keeps_drafts_in_the_most_frequent_ids() -> None:
    head = make_head().eval()
    batch, ids, embed = make_batch(batch=1)
    drafter = HeadDrafter(head, embed, draft_vocab_limit=2)
    drafter.accept(ids[0].tolist(), batch.features[0, :11])
    assert set(drafter.propose(5)) <= set(head.d2t[:2].tolist())


def test_sampled_drafts_come_with_their_distributions_over_the_target_vocab() -> None:
    head = make_head().eval()
    batch, ids, embed = make_batch(batch=1)
    params = SamplingParams(temperature=0.9, top_k=5, seed=4)

    def propose() -> tuple[list[int], torch.Tensor]:
        drafter = HeadDrafter(head, embed, sampling=params)
        drafter.accept(ids[0].tolist(), batch.features[0, :11])
        return drafter.propose(4), drafter.draft_probs

    drafts, probs = propose()
    assert probs.shape == (4, TARGET.vocab_size) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(4))
    off_subset = torch.ones(TARGET.vocab_size, dtype=torch.bool)
    off_subset[head.d2t] = False
    assert (probs[:, off_subset] == 0).all() and ((probs > 0).sum(dim=1) <= 5).all()  # top-k 5
    assert all(probs[j, d] > 0 for j, d in enumerate(drafts))
    again, probs_again = propose()  # drawn with (draft_seed(seed), position): repeatable
    assert again == drafts and torch.equal(probs, probs_again)
    greedy = HeadDrafter(head, embed, sampling=SamplingParams())
    greedy.accept(ids[0].tolist(), batch.features[0, :11])
    assert greedy.propose(4) and greedy.draft_probs is None


def test_one_training_step_lowers_the_loss_on_a_fixed_batch() -> None:
    head = make_head()
    batch, _, _ = make_batch()
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)
    before, _ = ttt_loss(head, batch, steps=2)
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after, _ = ttt_loss(head, batch, steps=2)
    assert after.item() < before.item()


def _train(head: DraftHead, optimizer: torch.optim.Optimizer, seeds: list[int]) -> None:
    for seed in seeds:
        loss, _ = ttt_loss(head, make_batch(seed)[0], steps=2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_checkpoint_resume_equals_an_uninterrupted_run(tmp_path) -> None:
    straight = make_head()
    opt = torch.optim.AdamW(straight.parameters(), lr=1e-3)
    _train(straight, opt, [1, 2, 3])

    first = make_head()
    opt = torch.optim.AdamW(first.parameters(), lr=1e-3)
    _train(first, opt, [1])
    torch.save({"head": first.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    resumed = make_head(seed=7)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(ckpt["head"])
    opt = torch.optim.AdamW(resumed.parameters(), lr=1e-3)
    opt.load_state_dict(ckpt["optimizer"])
    _train(resumed, opt, [2, 3])
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_saved_head_loads_with_its_config_and_vocab_map(tmp_path) -> None:
    head = make_head()
    head.save(tmp_path / "head.safetensors", dtype=torch.float32, metadata={"recipe": "{}"})
    loaded = DraftHead.load(tmp_path / "head.safetensors")
    assert loaded.config == head.config
    for (name, a), b in zip(head.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_cpu_linears_draft_what_the_torch_linears_draft() -> None:
    """use_cpu_linears swaps the block's projections and the subset LM head for the fp32 kernel: same
    drafts, logits equal up to the order of fp32 additions."""
    head = make_head(3).eval()
    _, ids, embed = make_batch(3)
    features = torch.randn(6, len(LAYERS) * TARGET.hidden_size, generator=torch.Generator().manual_seed(4))
    tokens = ids[0, :7].tolist()
    plain = HeadDrafter(head, embed)
    plain.accept(tokens, features)
    before = (plain.propose(4), head.logits(plain.last[0, -1]))
    assert head.use_cpu_linears() == 5
    fast = HeadDrafter(head, embed)
    fast.accept(tokens, features)
    assert fast.propose(4) == before[0]
    torch.testing.assert_close(head.logits(fast.last[0, -1]), before[1], atol=1e-4, rtol=1e-4)
