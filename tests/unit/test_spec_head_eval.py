"""The training-way held-out figures predict what chain speculation measures: same τ, same first drafts."""
from __future__ import annotations

import pytest
import torch

from engine.model_files import load_model
from engine.spec.chain_replay import chain_replay
from engine.spec.draft_head import DraftHead, DraftHeadConfig, build_vocab_map, target_to_draft
from engine.spec.head_drafter import HeadDrafter
from engine.spec.head_eval import held_out, walk
from engine.spec.train_data import Example, make_batch
from engine.spec.ttt import ttt_loss

pytestmark = pytest.mark.timeout(120)

LAYERS = (1, 1, 0)
PROMPTS = [[5, 6, 7, 8, 5, 6, 7], [1, 2, 3, 4, 1, 2, 3, 4, 1, 2], [9] * 5, [40, 41, 42, 43]]


def test_walk_emits_the_accepted_drafts_and_the_targets_token() -> None:
    # 8 tokens, the prompt's last at index 2: the first reply token (index 3) comes from the prefill, so
    # rows 2.. draft; row 2 gets 2 drafts right (tokens 4, 5 + the target's 6), row 5 none (7), then done.
    assert walk([0, 0, 2, 0, 0, 0, 0], first_row=2, num_tokens=8) == (2, 4, 1)
    # A chain running past the reply's end is capped there; the last token is the target's own.
    assert walk([0, 5, 5, 5], first_row=1, num_tokens=6) == (1, 3, 1)
    assert walk([0, 0], first_row=0, num_tokens=2) == (0, 0, 0)  # the prefill's token was the last


def test_held_out_chain_tau_is_the_replays_tau() -> None:
    """A head trained a little on the target's replies: its training-way chain walk over those replies
    gives exactly the τ and first-draft acceptance that drafting it in chain_replay measures."""
    config, model = load_model("random:tiny")
    plain = chain_replay(model, PROMPTS, 24, batch=4, feature_layers=LAYERS, keep_features=True)
    examples = [Example(torch.tensor(p + out), len(p), f)
                for p, out, f in zip(PROMPTS, plain.outputs, plain.features, strict=True)]
    counts = sum(torch.bincount(e.token_ids[e.num_prompt_tokens:], minlength=config.vocab_size)
                 for e in examples)
    torch.manual_seed(0)
    head = DraftHead(DraftHeadConfig.for_target(config, LAYERS, 64))
    head.d2t.copy_(build_vocab_map(counts, 64))
    t2d = target_to_draft(head.d2t, config.vocab_size)
    columns = torch.arange(len(LAYERS) * config.hidden_size)
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    for _ in range(15):  # enough that some drafts are right, not all
        loss, _ = ttt_loss(head, make_batch(examples, columns, model.embed_tokens, t2d, "cpu", 64), 3)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    head.eval()

    replay = chain_replay(model, PROMPTS, 24, make_drafter=lambda: HeadDrafter(head, model.embed_tokens),
                          k=3, batch=4, feature_layers=LAYERS)
    assert replay.outputs == plain.outputs
    assert 0 < sum(replay.accepted) < sum(replay.drafted)
    figures = held_out(head, examples, columns, model.embed_tokens, t2d, torch.device("cpu"),
                       prompt_context=1 << 30, steps=3)
    assert figures.chain_tau == pytest.approx(replay.tau)
    assert figures.first_accept == pytest.approx(sum(replay.first_kept) / sum(replay.steps))
    assert figures.reply_tokens == sum(len(o) for o in plain.outputs)
    assert all(a >= b for a, b in zip(figures.accuracy, figures.accuracy_all, strict=True))
