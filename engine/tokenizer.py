"""Text <-> token ids for one model (GGUF or HF tokenizer.json) and its chat template, cached per path."""
from __future__ import annotations

import json
import logging
import mmap
import struct
import threading
import time
from array import array
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as _HFTokenizer

log = logging.getLogger(__name__)


class TokenizerError(RuntimeError):
    """The tokenizer can't be built from a path, or a call got input it can't handle (bad ids or messages)."""


# ---------------------------------------------------------------- GGUF metadata (header only, no tensor data)

_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_ARRAY_CODES = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "B",
                     10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """All key/value metadata of a GGUF file (v2/v3). Reads only the header: ~0.1 s, not seconds."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise TokenizerError(f"{path} is not a GGUF file (bad magic)")
        version, _n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise TokenizerError(f"{path}: GGUF version {version} is not supported (only v2/v3)")
        pos, meta = 24, {}
        try:
            for _ in range(n_kv):
                key, pos = _gguf_string(buf, pos)
                (vtype,) = struct.unpack_from("<I", buf, pos)
                meta[key], pos = _gguf_value(buf, pos + 4, vtype)
        except (struct.error, UnicodeDecodeError, KeyError) as e:
            raise TokenizerError(f"{path}: corrupt GGUF metadata ({e!r})") from e
        return meta


def _gguf_string(buf: mmap.mmap, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, pos)
    return buf[pos + 8:pos + 8 + n].decode("utf-8"), pos + 8 + n


def _gguf_value(buf: mmap.mmap, pos: int, vtype: int) -> tuple[Any, int]:
    if vtype == _GGUF_STRING:
        return _gguf_string(buf, pos)
    if vtype == _GGUF_ARRAY:
        etype, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if etype == _GGUF_STRING:
            items = []
            for _ in range(count):
                item, pos = _gguf_string(buf, pos)
                items.append(item)
            return items, pos
        if etype == _GGUF_ARRAY:
            items = []
            for _ in range(count):
                (inner_type,) = struct.unpack_from("<I", buf, pos)
                item, pos = _gguf_value(buf, pos + 4, inner_type)
                items.append(item)
            return items, pos
        code = _GGUF_ARRAY_CODES[etype]
        values = array(code)
        end = pos + count * values.itemsize
        values.frombytes(buf[pos:end])  # GGUF is little-endian, as is every host we run on
        return values.tolist(), end
    fmt = _GGUF_SCALARS[vtype]
    return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)


# ---------------------------------------------------------------- byte-level BPE from GGUF metadata

_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4
# llama.cpp's pre-tokenizer names -> how the text is split before BPE. These are the ones we build natively
# (fast); any other GGUF tokenizer goes through transformers' converter (slow but faithful).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_PLAIN_GPT2 = ("gpt-2", "gpt2", "default", "olmo", "jais", "poro-chat", "viking")
_LLAMA3 = ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "falcon3", "dbrx")
# Tokens llama.cpp treats as end-of-generation when the vocabulary has them as control tokens.
_EOG_TOKEN_TEXTS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>",
                    "<EOT>")


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable-char map (the spelling byte-level BPE vocabularies use)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {b: b for b in keep}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {b: chr(c) for b, c in chars.items()}


def _gpt2_pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer | None:
    if pre in _DIGITS_THEN_GPT2:  # llama.cpp: "\p{N}" split first, then the GPT-2 regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in _PLAIN_GPT2 or pre is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _LLAMA3:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return None


def _build_gguf_byte_level(meta: dict[str, Any], pre: pre_tokenizers.PreTokenizer) -> _HFTokenizer:
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    # Some converters store a token in plain UTF-8 instead of the byte alphabet; respell it so merges match.
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    tok = _HFTokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                  end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise TokenizerError(f"GGUF has {len(tokens)} tokens but {len(types)} token types")
    # Control tokens (<|im_start|>...) must match whole in text; one spelled outside the byte alphabet is a
    # converter mislabel and adding it would grow the vocabulary past the model's.
    typed = list(zip(tokens, types, strict=True))
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, ty in typed if ty == _TOKEN_CONTROL and set(t) <= alphabet])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, ty in typed if ty == _TOKEN_USER_DEFINED and t in vocab])
    return tok


def _build_gguf_via_transformers(path: Path) -> _HFTokenizer:
    # Imported lazily: transformers costs seconds to import and only non-byte-level GGUFs need it.
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        convert_gguf_tokenizer,
        get_gguf_tokenizer,
    )

    architecture, tokenizer_dict, _ = get_gguf_tokenizer(str(path))
    backend, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
    return backend


def _with_bos_eos(tok: _HFTokenizer, bos: tuple[str, int] | None, eos: tuple[str, int] | None) -> None:
    """A post-processor that adds BOS/EOS on encode, as the GGUF's add_bos/add_eos flags ask."""
    if bos is None and eos is None:
        return
    single = " ".join(([f"{bos[0]}:0"] if bos else []) + ["$A:0"] + ([f"{eos[0]}:0"] if eos else []))
    specials = [s for s in (bos, eos) if s is not None]
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)


# ---------------------------------------------------------------- the Tokenizer

_CACHE: dict[tuple[str, int, int], Tokenizer] = {}
_CACHE_LOCK = threading.Lock()


class Tokenizer:
    """One model's tokenizer: encode raw text, render + encode chat, decode ids. Build with `from_model`."""

    def __init__(self, backend: _HFTokenizer, *, path: Path, name: str, vocab_size: int,
                 bos_token_id: int | None, eos_token_ids: tuple[int, ...], chat_template: str | None,
                 special_token_texts: dict[str, str]) -> None:
        self._backend = backend
        self._path = path
        self.name = name
        self.vocab_size = vocab_size
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids
        self.chat_template = chat_template
        self._special_token_texts = special_token_texts  # bos_token/eos_token/... strings for the template
        self._num_ids = backend.get_vocab_size(with_added_tokens=True)
        self.all_special_ids: frozenset[int] = frozenset(
            i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        self._template = None  # compiled lazily: most workers never render chat

    @classmethod
    def from_model(cls, path: str | Path) -> Tokenizer:
        """A GGUF file or an HF directory with tokenizer.json; offline. Cached per (path, mtime, size)."""
        p = Path(path).expanduser().resolve()
        try:
            st = p.stat()
        except OSError as e:
            raise TokenizerError(f"tokenizer path {p} does not exist") from e
        key = (str(p), st.st_mtime_ns, st.st_size)
        with _CACHE_LOCK:  # one build per path even when the router's threads ask at once
            cached = _CACHE.get(key)
            if cached is None:
                t0 = time.perf_counter()
                cached = cls._load_gguf(p) if p.is_file() else cls._load_hf_dir(p)
                log.info("tokenizer %s loaded in %.2f s", cached.name, time.perf_counter() - t0)
                _CACHE[key] = cached
            return cached

    @classmethod
    def _load_gguf(cls, path: Path) -> Tokenizer:
        meta = read_gguf_metadata(path)
        tokens = meta.get("tokenizer.ggml.tokens")
        if not tokens:
            raise TokenizerError(f"{path}: GGUF has no tokenizer.ggml.tokens")
        kind, pre_name = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre")
        pre = _gpt2_pre_tokenizer(pre_name) if kind == "gpt2" else None
        if pre is not None and "tokenizer.ggml.merges" in meta:
            backend = _build_gguf_byte_level(meta, pre)
        else:
            log.info("GGUF tokenizer model=%r pre=%r: building through transformers (slower)", kind, pre_name)
            try:
                backend = _build_gguf_via_transformers(path)
            except Exception as e:  # transformers raises ValueError/KeyError/... for what it can't convert
                raise TokenizerError(f"{path}: cannot build tokenizer model={kind!r} pre={pre_name!r}: {e}") \
                    from e

        def tid(key: str) -> int | None:
            value = meta.get(f"tokenizer.ggml.{key}")
            return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

        bos, eos = tid("bos_token_id"), tid("eos_token_id")
        # llama.cpp adds BOS for SentencePiece vocabularies unless told otherwise, never for byte-level ones.
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
        add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
        _with_bos_eos(backend, (tokens[bos], bos) if add_bos and bos is not None else None,
                      (tokens[eos], eos) if add_eos and eos is not None else None)
        types = meta.get("tokenizer.ggml.token_type") or []
        eog = [i for i in (eos, tid("eot_token_id"), tid("eom_token_id")) if i is not None]
        eog += [i for i, t in enumerate(tokens) if t in _EOG_TOKEN_TEXTS
                and i < len(types) and types[i] == _TOKEN_CONTROL]
        texts = {name: tokens[i] for name, i in (("bos_token", bos), ("eos_token", eos), ("unk_token",
                 tid("unknown_token_id")), ("pad_token", tid("padding_token_id"))) if i is not None}
        return cls(backend, path=path, name=path.name.removesuffix(".gguf"), vocab_size=len(tokens),
                   bos_token_id=bos, eos_token_ids=tuple(dict.fromkeys(eog)),
                   chat_template=meta.get("tokenizer.chat_template"), special_token_texts=texts)

    @classmethod
    def _load_hf_dir(cls, path: Path) -> Tokenizer:
        if not (path / "tokenizer.json").is_file():
            raise TokenizerError(f"{path} has no tokenizer.json (need a GGUF file or an HF tokenizer dir)")
        try:
            backend = _HFTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # the Rust side raises a bare Exception for a malformed file
            raise TokenizerError(f"{path / 'tokenizer.json'}: {e}") from e
        config = _read_json(path / "tokenizer_config.json")
        names = ("bos_token", "eos_token", "unk_token", "pad_token")
        texts = {name: _token_text(config.get(name)) for name in names}
        texts = {name: text for name, text in texts.items() if text is not None}
        bos = backend.token_to_id(texts["bos_token"]) if "bos_token" in texts else None
        eos: list[int] = [backend.token_to_id(texts["eos_token"])] if "eos_token" in texts else []
        for extra in (_read_json(path / "generation_config.json"), _read_json(path / "config.json")):
            ids = extra.get("eos_token_id")
            eos += ids if isinstance(ids, list) else [ids] if isinstance(ids, int) else []
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if (path / "chat_template.jinja").is_file():  # newer HF layout keeps the template beside the config
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(backend, path=path, name=path.name,
                   vocab_size=backend.get_vocab_size(with_added_tokens=True),
                   bos_token_id=bos, eos_token_ids=tuple(dict.fromkeys(i for i in eos if i is not None)),
                   chat_template=template, special_token_texts=texts)

    def __reduce__(self) -> tuple:
        # Ships as its path: the receiving process rebuilds it (from its own cache) instead of pickling vocab.
        return (Tokenizer.from_model, (str(self._path),))

    def __repr__(self) -> str:
        return (f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, "
                f"eos_token_ids={self.eos_token_ids})")

    # ---- encode / decode

    def encode(self, text: str) -> list[int]:
        """Ids for a raw-text prompt, with BOS when the model's tokenizer adds one."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects str, got {type(text).__name__}")
        return self._encode(text, add_special_tokens=True)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        # encode_batch releases the GIL and encode does not: a router thread tokenizing a prompt of megabytes
        # (a second or more) then leaves the event loop, and every other request's stream, running.
        return self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text for ids; bytes that don't form complete UTF-8 come out as U+FFFD (as in HF's decode)."""
        ids = list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self._num_ids):
            raise TokenizerError(f"token id out of range [0, {self._num_ids}): got min {min(ids)}, "
                                 f"max {max(ids)}")
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        """The vocabulary spelling of each id (byte-level: GPT-2's byte alphabet); None if unknown."""
        return [self._backend.id_to_token(int(i)) for i in ids]

    def is_special(self, token_id: int) -> bool:
        return token_id in self.all_special_ids

    # ---- chat

    def render_chat_template(self, messages: list[dict[str, str]]) -> str:
        """The chat rendered by the model's own template, add_generation_prompt=True (as HF renders it)."""
        if self.chat_template is None:
            raise TokenizerError(f"model {self.name} has no chat template; send a raw-text prompt instead")
        _check_messages(messages)
        import jinja2  # lazy: only the router renders chat, and jinja2 adds import time everywhere else

        if self._template is None:
            self._template = _compile_template(self.chat_template)
        try:
            return self._template.render(messages=messages, add_generation_prompt=True,
                                         **self._special_token_texts)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template failed: {e}") from e

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        """Ids of the rendered chat: special tokens come from the template text, none added (as HF does)."""
        return self._encode(self.render_chat_template(messages), add_special_tokens=False)


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise TokenizerError("messages must be a non-empty list of {'role': str, 'content': str}")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise TokenizerError(f"messages[{i}] must be a dict with str 'role' and 'content', got {m!r}")


def _compile_template(source: str) -> Any:
    """The template in the sandboxed Jinja setup transformers uses, so renders match HF's byte for byte."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        # Jinja's own tojson HTML-escapes; templates expect plain JSON.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise TokenizerError(f"chat template does not compile: {e}") from e


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: {e}") from e
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json spells a special token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None
