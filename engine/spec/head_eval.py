"""A draft head's held-out figures computed the training way: per-step accuracy and the chain τ it implies."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.spec.draft_head import DraftHead
from engine.spec.train_data import Example, make_batch
from engine.spec.ttt import unroll


@dataclass(frozen=True)
class HeldOut:
    """accuracy: per unrolled step, the share of reply tokens in the draft vocabulary predicted (what
    training logs; every position counted, whatever the earlier steps drafted). accuracy_all: the same over
    every reply token (one outside the draft vocabulary can never be drafted). chain_tau / first_accept: the
    tokens per verify step and the share of verify steps whose first draft is accepted, when greedy chain
    speculation with k = the unrolled steps walks the replies — what the engine measures, from the same
    forwards (a step's chain stops at its first wrong draft; the next step starts after the target's token).
    """

    accuracy: list[float]
    accuracy_all: list[float]
    chain_tau: float
    first_accept: float
    reply_tokens: int

    def as_dict(self) -> dict:
        return {"accuracy": self.accuracy, "accuracy_all": self.accuracy_all,
                "chain_tau": round(self.chain_tau, 3), "first_accept": round(self.first_accept, 3),
                "reply_tokens": self.reply_tokens}


def walk(accepted: Sequence[int], first_row: int, num_tokens: int) -> tuple[int, int, int]:
    """(verify steps, tokens emitted, steps whose first draft was kept) of a chain walk over one reply.

    accepted[t]: how many leading drafts row t's chain gets right (row t reads the token at t + 1). The
    first reply token (at first_row + 1) comes from the prompt's forward, as in the engine; each verify
    step emits its accepted drafts and the target's own token, capped at the reply's end (whose last token
    is always the target's: chain_replay drafts within the budget and never accepts an EOS draft).
    """
    steps = emitted = kept = 0
    t = first_row
    while (left := num_tokens - t - 2) > 0:
        n = min(accepted[t] + 1, left)
        steps, emitted, kept = steps + 1, emitted + n, kept + (n > 1)
        t += n
    return steps, emitted, kept


@torch.no_grad()
def held_out(head: DraftHead, examples: Sequence[Example], columns: torch.Tensor, embed: torch.nn.Embedding,
             t2d: torch.Tensor, device: torch.device, prompt_context: int, steps: int,
             batch_size: int = 8) -> HeldOut:
    """The figures of HeldOut over `examples` (token ids, target features), `batch_size` at a time."""
    hits = [[0, 0, 0] for _ in range(steps)]  # per step: correct, in vocabulary, reply tokens
    walked = [0, 0, 0]
    was_training = head.training
    head.eval()
    for i in range(0, len(examples), batch_size):
        part = list(examples[i:i + batch_size])
        batch = make_batch(part, columns, embed, t2d, device, prompt_context)
        # A reply token outside the draft vocabulary has label -1: make_batch's labels can't tell it from
        # the prompt, so the reply rows are marked from the token ids.
        starts = [max(0, e.num_prompt_tokens - prompt_context) for e in part]
        reply = torch.zeros_like(batch.labels, dtype=torch.bool)
        for b, (e, s) in enumerate(zip(part, starts, strict=True)):
            reply[b, e.num_prompt_tokens - s:len(e.token_ids) - s] = True
        run = torch.ones(batch.labels.shape[0], batch.labels.shape[1] - 1, dtype=torch.int64, device=device)
        accepted = torch.zeros_like(run)
        for step, (logits, labels) in enumerate(unroll(head, batch, steps)):
            length = labels.shape[1]
            in_reply = reply[:, 2 + step:2 + step + length]
            in_reply = torch.nn.functional.pad(in_reply, (0, length - in_reply.shape[1]))
            correct = (logits.argmax(-1) == labels) & (labels >= 0)
            hits[step][0] += int(correct.sum())
            hits[step][1] += int((labels >= 0).sum())
            hits[step][2] += int(in_reply.sum())
            run = run * correct
            accepted += run
        for b, (e, s) in enumerate(zip(part, starts, strict=True)):
            counts = walk(accepted[b].tolist(), e.num_prompt_tokens - s - 1, len(e.token_ids) - s)
            walked = [w + c for w, c in zip(walked, counts, strict=True)]
    head.train(was_training)
    return HeldOut([round(c / max(n, 1), 4) for c, n, _ in hits],
                   [round(c / max(r, 1), 4) for c, _, r in hits],
                   walked[1] / max(walked[0], 1), walked[2] / max(walked[0], 1), hits[0][2])
