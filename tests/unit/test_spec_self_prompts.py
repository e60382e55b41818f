"""User messages sampled from the target: seeded, distinct, ended, evaluation prompts kept out."""
from __future__ import annotations

import pytest

from engine.model_files import load_model, read_model_config, resolve_model_path
from engine.spec.self_prompts import sample_user_messages, user_turn_prefix
from engine.tokenizer import Tokenizer

pytestmark = pytest.mark.timeout(120)

END_IDS = tuple(range(0, 512, 8))  # random:tiny's vocabulary is 512: one id in 8 ends a message


class NumberTokenizer:
    """Ids as text (the tiny model has no tokenizer); the template wraps the user's ids in fixed ones."""

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        content = [int(t) for t in messages[0]["content"].split()]
        return [1, 2, 3, *content, 0, 4, 5]

    def decode(self, ids: list[int]) -> str:
        return " ".join(str(i) for i in ids)


def test_the_prefix_is_the_template_up_to_the_users_message() -> None:
    assert user_turn_prefix(NumberTokenizer(), END_IDS) == [1, 2, 3]
    tokenizer = Tokenizer.from_model(resolve_model_path(None))
    prefix = user_turn_prefix(tokenizer, read_model_config(None).eos_token_ids)
    text = tokenizer.decode(prefix, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_end|>\n<|im_start|>user\n")


def test_messages_are_seeded_distinct_ended_and_exclude_the_given_texts() -> None:
    _, model = load_model("random:tiny")
    tokenizer = NumberTokenizer()

    def draw(seed: int, exclude=()) -> list[str]:
        return sample_user_messages(model, tokenizer, 12, seed, end_ids=END_IDS, batch=8, max_tokens=24,
                                    min_chars=4, exclude=exclude)

    first = draw(0)
    assert first == draw(0) and first != draw(1)
    assert len(first) == 12 == len({m.casefold() for m in first})
    assert all(len(m) >= 4 and not {int(t) for t in m.split()} & set(END_IDS) for m in first)
    kept = draw(0, exclude=[f"  {first[3].upper()} "])
    assert first[3] not in kept and len(kept) == 12
