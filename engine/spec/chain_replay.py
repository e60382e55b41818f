"""Greedy chain speculation over the plain target with a private cache: offline acceptance and training data.

The engine's multi-token steps will run speculation for real; this loop needs none of them. Each round every
active sequence verifies [last token, drafts…] in one batched target forward, keeps the drafts that equal the
target's greedy token before them, plus the target's own next token, and hands the drafter the accepted
tokens and their features. With no drafter it is plain greedy decoding (one token per sequence per forward).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from engine.model import LlamaModel
from engine.spec.drafter import Drafter
from engine.spec.target_forward import TargetForward


@dataclass
class ReplayResult:
    """Per prompt: output ids, verify forwards, drafted and accepted tokens, verify forwards whose first draft
    was accepted; features kept on request."""

    outputs: list[list[int]]
    steps: list[int]
    drafted: list[int]
    accepted: list[int]
    first_kept: list[int] = field(default_factory=list)
    features: list[torch.Tensor] = field(default_factory=list)  # [prompt + output - 1, F·H] per prompt

    @property
    def tau(self) -> float:
        """Tokens emitted per verify forward (accepted drafts + the target's own token), over all prompts."""
        return sum(len(o) - 1 for o in self.outputs) / max(sum(self.steps), 1)


def chain_replay(
    model: LlamaModel, prompts: Sequence[Sequence[int]], max_tokens: int, *,
    make_drafter: Callable[[], Drafter] | None = None, k: int = 0, batch: int = 8,
    eos_token_ids: Sequence[int] = (), feature_layers: Sequence[int] | None = None,
    keep_features: bool = False, progress: str | None = None,
) -> ReplayResult:
    """Greedy outputs (≤ max_tokens each, EOS ends one) of `prompts`, `batch` sequences per forward.

    The first token comes from the prompt's forward and costs no verify step; τ counts the rest.
    """
    result = ReplayResult([], [], [], [])
    bar = tqdm(total=len(prompts) * max_tokens, desc=progress, unit="tok", disable=progress is None)
    for first in range(0, len(prompts), batch):
        group = [list(p) for p in prompts[first:first + batch]]
        part = _replay_group(model, group, max_tokens, make_drafter, k, set(eos_token_ids),
                             feature_layers, keep_features, bar)
        for name in ("outputs", "steps", "drafted", "accepted", "first_kept", "features"):
            getattr(result, name).extend(getattr(part, name))
    bar.close()
    return result


def _replay_group(model, prompts, max_tokens, make_drafter, k, eos, feature_layers, keep_features, bar):
    n = len(prompts)
    runner = TargetForward(model, n, max(len(p) for p in prompts) + max_tokens + k + 1,
                           feature_layers=feature_layers)
    tokens = [list(p) for p in prompts]
    drafters = [make_drafter() for _ in range(n)] if make_drafter is not None else [None] * n
    feats: list[list[torch.Tensor]] = [[] for _ in range(n)]
    steps, drafted, accepted, first_kept = [0] * n, [0] * n, [0] * n, [0] * n
    hidden, features = runner.forward([(i, 0, p) for i, p in enumerate(prompts)])
    ends = torch.tensor([len(p) for p in prompts]).cumsum(0) - 1
    firsts = model.compute_logits(hidden[ends]).argmax(-1).tolist()
    row = 0
    for i, p in enumerate(prompts):
        tokens[i].append(firsts[i])
        _accepted(drafters[i], feats[i], tokens[i], features[row:row + len(p)], keep_features)
        row += len(p)
    bar.update(n)
    active = [i for i in range(n) if not _done(tokens[i], prompts[i], max_tokens, eos)]
    while active:
        rows, proposals = [], []
        for i in active:
            budget = max_tokens - (len(tokens[i]) - len(prompts[i])) - 1  # the target's own token is free
            drafts = drafters[i].propose(k)[:budget] if drafters[i] is not None and budget > 0 else []
            proposals.append(drafts)
            rows.append((i, len(tokens[i]) - 1, [tokens[i][-1], *drafts]))
        hidden, features = runner.forward(rows)
        greedy = model.compute_logits(hidden).argmax(-1).tolist()
        row = 0
        for i, drafts in zip(active, proposals, strict=True):
            target = greedy[row:row + len(drafts) + 1]
            taken = 0
            while taken < len(drafts) and drafts[taken] == target[taken] and drafts[taken] not in eos:
                taken += 1
            new = drafts[:taken] + [target[taken]]
            before = len(tokens[i])
            tokens[i].extend(new)
            steps[i] += 1
            drafted[i] += len(drafts)
            accepted[i] += taken
            first_kept[i] += taken > 0
            _accepted(drafters[i], feats[i], tokens[i], features[row:row + taken + 1], keep_features)
            bar.update(len(tokens[i]) - before)
            row += len(drafts) + 1
        active = [i for i in active if not _done(tokens[i], prompts[i], max_tokens, eos)]
    runner.close()
    outputs = [t[len(p):] for t, p in zip(tokens, prompts, strict=True)]
    kept = [torch.cat(f) for f in feats] if keep_features else []
    return ReplayResult(outputs, steps, drafted, accepted, first_kept, kept)


def _accepted(drafter: Drafter | None, kept: list[torch.Tensor], tokens: list[int], features: torch.Tensor,
              keep: bool) -> None:
    if drafter is not None:
        drafter.accept(tokens, features if drafter.needs_features else None)
    if keep:
        kept.append(features.clone())


def _done(tokens: list[int], prompt: list[int], max_tokens: int, eos: set[int]) -> bool:
    return len(tokens) - len(prompt) >= max_tokens or tokens[-1] in eos
