"""The draft head's training prompts: drawn from a doc tree, reproducible by seed, shipped as a file."""
from __future__ import annotations

import gzip
import random
from pathlib import Path

from engine.spec.train_data import (
    _INSTRUCTIONS,
    doc_paragraphs,
    mixed_prompts,
    read_prompts,
    topic_words,
    write_prompts,
)

PARAGRAPH = ("The {w} daemon reads its configuration at start-up and writes a short report of every "
             "connection it accepts, so that an administrator can follow what the {w} service does.")


def make_docs(root: Path) -> None:
    (root / "pkg").mkdir(parents=True)
    words = ["spooler", "resolver", "scheduler", "mailer", "indexer", "tracker"]
    text = "\n\n".join(PARAGRAPH.format(w=w) + f" Note {i}." for i, w in enumerate(words * 4))
    (root / "pkg" / "README").write_text(text)
    with gzip.open(root / "pkg" / "notes.txt.gz", "wt") as f:
        f.write(text.replace("Note", "Remark"))
    (root / "pkg" / "copyright").write_text(PARAGRAPH.format(w="licence"))


def test_mixed_prompts_are_seeded_and_hold_both_kinds(tmp_path) -> None:
    make_docs(tmp_path)
    prompts = mixed_prompts(20, seed=3, questions=0.5, root=tmp_path)
    assert prompts == mixed_prompts(20, seed=3, questions=0.5, root=tmp_path)
    assert prompts != mixed_prompts(20, seed=4, questions=0.5, root=tmp_path)
    with_paragraph = [p for p in prompts if "daemon reads its configuration" in p]
    assert len(with_paragraph) == 10 and len(set(prompts)) == 20
    assert not any("licence" in p for p in prompts)  # copyright files are skipped
    # No questions: the paragraph-only draw the shipped head was trained on (seeded sample, then one
    # instruction per paragraph, in that order).
    rng = random.Random(3)
    paragraphs = rng.sample(doc_paragraphs(tmp_path), 6)
    assert mixed_prompts(6, seed=3, questions=0.0, root=tmp_path) == [
        rng.choice(_INSTRUCTIONS).format(p) for p in paragraphs]


def test_topic_words_keep_frequent_words_without_stopwords() -> None:
    words = topic_words([PARAGRAPH.format(w="spooler") + " Which should rarely matter."] * 20)
    assert "spooler" in words and "daemon" in words
    assert "configuration" not in words  # over 12 letters
    assert "should" not in words and "which" not in words  # a stopword; capitalised
    assert "rarely" in words and "rarely" not in topic_words([PARAGRAPH.format(w="x") + " rarely"] * 19)


def test_prompts_file_round_trips_newlines(tmp_path) -> None:
    prompts = ["Summarize this.\n\nA paragraph.", 'Quote "this"', "Plain"]
    write_prompts(tmp_path / "p" / "prompts.jsonl", prompts)
    assert read_prompts(tmp_path / "p" / "prompts.jsonl") == prompts
