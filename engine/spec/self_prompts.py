"""User messages sampled from the target itself: chat requests from its own idea of what users ask."""
from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
from tqdm import tqdm

from engine.model import LlamaModel
from engine.spec.target_forward import TargetForward
from engine.tokenizer import Tokenizer


def user_turn_prefix(tokenizer: Tokenizer, end_ids: Sequence[int]) -> list[int]:
    """The chat template's ids up to where the user's message starts (system turn included): an empty
    message's template, cut at the end-of-turn id that closes the user's turn (the last one in it)."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": ""}])
    return ids[:max(i for i, t in enumerate(ids) if t in set(end_ids))]


@torch.no_grad()
def sample_user_messages(model: LlamaModel, tokenizer: Tokenizer, count: int, seed: int, *,
                         end_ids: Sequence[int], batch: int = 64, max_tokens: int = 48,
                         temperature: float = 1.0, top_p: float = 0.95, min_chars: int = 12,
                         exclude: Collection[str] = ()) -> list[str]:
    """`count` distinct user messages the target writes after the template's user header, sampled with
    (`temperature`, `top_p`) from a generator seeded with `seed`. A message that does not end (an id of
    `end_ids`) within `max_tokens`, or is shorter than `min_chars`, is dropped: it is cut off or empty; so
    is one equal to an `exclude` text up to case and surrounding space (the evaluation prompts). Stops
    after 4 × `count` attempts (a degenerate model repeats itself) and returns what it has."""
    prefix = user_turn_prefix(tokenizer, end_ids)
    device = model.embed_tokens.weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    ends_set = set(end_ids)
    ends = torch.tensor(sorted(ends_set), device=device)
    out: list[str] = []
    seen = {text.strip().casefold() for text in exclude}
    bar = tqdm(total=count, desc="prompts", unit="prompt")
    attempts = 0
    while len(out) < count and attempts < 4 * count:
        n = min(batch, 4 * count - attempts)
        attempts += n
        runner = TargetForward(model, n, len(prefix) + max_tokens + 1)
        hidden, _ = runner.forward([(i, 0, prefix) for i in range(n)])
        last = hidden[torch.arange(1, n + 1, device=device) * len(prefix) - 1]
        tokens = torch.zeros(n, max_tokens, dtype=torch.int64, device=device)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        for step in range(max_tokens):
            tokens[:, step] = _draw(model.compute_logits(last), temperature, top_p, gen)
            done |= torch.isin(tokens[:, step], ends)
            if bool(done.all()) or step + 1 == max_tokens:
                break
            drawn = tokens[:, step].tolist()  # one host sync per step, not per row
            hidden, _ = runner.forward([(i, len(prefix) + step, [t]) for i, t in enumerate(drawn)])
            last = hidden
        runner.close()
        for row in tokens.tolist():
            cut = next((j for j, t in enumerate(row) if t in ends_set), None)
            text = tokenizer.decode(row[:cut]).strip() if cut is not None else ""
            if len(text) >= min_chars and text.casefold() not in seen and len(out) < count:
                seen.add(text.casefold())
                out.append(text)
                bar.update(1)
    bar.close()
    return out


def _draw(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """One id per row of logits [N, V]: temperature, then the smallest top-p set, then a seeded draw."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # the top token always stays
    sorted_probs = sorted_probs * keep
    choice = torch.multinomial(sorted_probs, 1, generator=gen)
    return order.gather(1, choice).squeeze(1)
