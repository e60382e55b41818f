"""Self-distillation data for the draft head: prompts over Debian package docs, the target's replies."""
from __future__ import annotations

import gzip
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.model import LlamaModel
from engine.spec.chain_replay import chain_replay
from engine.spec.ttt import Batch

DOC_ROOT = Path("/usr/share/doc")
# Licence texts repeat across hundreds of packages, changelogs are terse lists: neither reads like a request.
_SKIP_NAMES = re.compile(r"^(copyright|changelog|news|license|copying)", re.IGNORECASE)
# Code and markup read badly as prose prompts (and the eval prompts are chat questions).
_SKIP_SUFFIXES = {".js", ".css", ".html", ".htm", ".py", ".c", ".h", ".json", ".xml", ".svg", ".pl", ".sh"}
_INSTRUCTIONS = (
    "Summarize the following text in a few sentences.\n\n{}",
    "What is this text about? Explain it simply.\n\n{}",
    "Explain the following to someone new to Linux.\n\n{}",
    "Write three questions a reader might ask about this text, and answer them.\n\n{}",
    "Rewrite this text in plain English.\n\n{}",
    "What are the key points of the following?\n\n{}",
    "{}\n\nWhat does this mean in practice?",
    "Give a short example that illustrates this:\n\n{}",
)

# General requests over words drawn from the same docs: chat-shaped prompts (the eval prompts are chat
# questions), none of them taken from bench/quality/spec.py. One or two words fill each.
_QUESTIONS = (
    "What is {}? Explain it in simple terms.",
    "Write a short paragraph about {}.",
    "Give me three tips about {}.",
    "List five facts about {}.",
    "Explain {} to a ten-year-old.",
    "What are the advantages and disadvantages of {}?",
    "Write a short story that mentions {}.",
    "How would you teach someone about {}, step by step?",
    "Write a haiku about {}.",
    "Why does {} matter? Answer in a few sentences.",
    "Compare {} and {}.",
    "How are {} and {} related?",
    "Write a short dialogue between two friends about {} and {}.",
    "Give an everyday example of {} and one of {}.",
    # Everyday chat shapes (how-to, lists, letters, stories, step-by-step answers): what a chat user asks,
    # so the head sees the replies' openings and list formatting it must draft at serving time.
    "How do I get started with {}?",
    "Write a short poem about {}.",
    "Tell me a short story about {} and {}.",
    "Write a polite email asking a colleague about {}.",
    "Describe {} in simple terms.",
    "What should a beginner know about {}?",
    "Explain how {} works, step by step.",
    "List three ideas for a weekend project about {}.",
    "What is the difference between {} and {}?",
    "Give me a simple plan to learn about {} in a week.",
)
_STOPWORDS = frozenset(
    "about above after again against because before being below between both could does doing during each "
    "from further have having here into more most other over same should some such than that their them "
    "then there these they this those through under until very were what when where which while with would "
    "your also only just like used using will shall must might make made many much".split())


@dataclass(frozen=True)
class Example:
    """One prompt + reply: token ids, how many are prompt, the target's features per position but the last."""

    token_ids: torch.Tensor  # [N] int64
    num_prompt_tokens: int
    features: torch.Tensor  # [N - 1, F·H], stored as bfloat16


def _read_text(path: Path) -> str:
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except OSError:
        return ""
    if b"\0" in raw[:4096]:
        return ""  # binary
    return raw.decode("utf-8", errors="ignore")


def doc_paragraphs(root: Path = DOC_ROOT, min_chars: int = 160, max_chars: int = 700) -> list[str]:
    """Prose paragraphs from the docs (README, *.txt, *.md, …), deduplicated, in a fixed order."""
    seen: set[str] = set()
    out: list[str] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not _SKIP_NAMES.match(p.name)
                       and p.suffix.lower() not in _SKIP_SUFFIXES):
        for block in re.split(r"\n\s*\n", _read_text(path)):
            text = " ".join(block.split())
            letters = sum(ch.isalpha() or ch == " " for ch in text)
            if not min_chars <= len(text) <= max_chars or letters < 0.85 * len(text) or text in seen:
                continue
            seen.add(text)
            out.append(text)
    return out


def topic_words(paragraphs: Sequence[str], min_count: int = 20) -> list[str]:
    """Lowercase words of 5-12 letters seen at least `min_count` times in the paragraphs, sorted."""
    counts: dict[str, int] = {}
    for text in paragraphs:
        for word in re.findall(r"\b[a-z]{5,12}\b", text):
            counts[word] = counts.get(word, 0) + 1
    return sorted(w for w, c in counts.items() if c >= min_count and w not in _STOPWORDS)


def mixed_prompts(count: int, seed: int, questions: float = 0.5, root: Path = DOC_ROOT) -> list[str]:
    """`count` user messages: a `questions` share of word-list questions, the rest doc paragraphs under
    instructions, shuffled together with `seed`."""
    paragraphs = doc_paragraphs(root)
    if not paragraphs:
        raise FileNotFoundError(f"no prose paragraphs under {root}")
    rng = random.Random(seed)
    num_questions = round(count * questions)
    chosen = rng.sample(paragraphs, min(count - num_questions, len(paragraphs)))
    out = [rng.choice(_INSTRUCTIONS).format(p) for p in chosen]
    words = topic_words(paragraphs)
    for _ in range(num_questions):
        template = rng.choice(_QUESTIONS)
        out.append(template.format(*rng.sample(words, template.count("{}"))))
    if num_questions:  # with none, the draw is the shipped head's CPU recipe's, order included
        rng.shuffle(out)
    return out


def write_prompts(path: Path, prompts: Sequence[str]) -> None:
    """One JSON string per line (paragraph prompts hold newlines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts), encoding="utf-8")


def read_prompts(path: Path) -> list[str]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def build_examples(model: LlamaModel, prompts: Sequence[Sequence[int]], max_tokens: int,
                   feature_layers: Sequence[int], eos_token_ids: Sequence[int], batch: int
                   ) -> list[Example]:
    """The target's greedy replies, with the layer outputs captured in the same forwards (one pass)."""
    replay = chain_replay(model, prompts, max_tokens, batch=batch, eos_token_ids=eos_token_ids,
                          feature_layers=feature_layers, keep_features=True, progress="distill")
    return [Example(torch.tensor(list(p) + out), len(p), feats.to(torch.bfloat16))
            for p, out, feats in zip(prompts, replay.outputs, replay.features, strict=True)]


def make_batch(examples: list[Example], columns: torch.Tensor, embed: torch.nn.Embedding,
               t2d: torch.Tensor, device: torch.device, prompt_context: int) -> Batch:
    """Examples padded into one training Batch on `device`: ids' embeddings, the feature `columns`, labels
    (draft ids of reply tokens, -1 elsewhere and for tokens outside the draft vocabulary)."""
    # Only the last `prompt_context` prompt tokens are kept: the loss is on reply tokens only (the head
    # drafts replies; the prompt is context), and most of a training step's cost is rows, not loss.
    starts = [max(0, e.num_prompt_tokens - prompt_context) for e in examples]
    n = max(len(e.token_ids) - s for e, s in zip(examples, starts, strict=True))
    ids = torch.zeros(len(examples), n, dtype=torch.int64)
    labels = torch.full((len(examples), n), -1, dtype=torch.int64)
    # Features are built where they live (the GPU after a GPU distillation): no round trip through the host.
    feats = torch.zeros(len(examples), n, columns.numel(), device=device)
    for b, (e, s) in enumerate(zip(examples, starts, strict=True)):
        ids[b, :len(e.token_ids) - s] = e.token_ids[s:]
        labels[b, e.num_prompt_tokens - s:len(e.token_ids) - s] = t2d[e.token_ids[e.num_prompt_tokens:]]
        feats[b, :len(e.features) - s] = e.features[s:].to(device).float()[:, columns]
    ids, labels = ids.to(device), labels.to(device)
    with torch.no_grad():
        emb = embed(ids).float()
    return Batch(emb, feats, labels)
