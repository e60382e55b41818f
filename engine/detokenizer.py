"""Streaming detokenizer: new token ids in, complete UTF-8 text out, cut at the first stop string."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from contracts.sampling import InvalidSamplingParams
from engine.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"
# How many tokens may wait for a character to complete before we emit anyway. A real character needs at most
# 4 byte tokens; a longer wait means the model emits invalid UTF-8, and the window would grow forever.
_MAX_PENDING_TOKENS = 16


@dataclass(frozen=True)
class DetokenizedDelta:
    """Text made final by the last `add`; `stopped` once a stop string was reached (the text excludes it)."""

    text: str
    stopped: bool


class IncrementalDetokenizer:
    """Turns a sequence's output ids into text deltas whose concatenation is `tokenizer.decode(output ids)`.

    Each `add` decodes only a small window (vLLM's prefix/read offsets): `_prefix` .. `_read` are tokens
    already emitted, kept as context so leading-space rules (SentencePiece's stripped first space, byte-level
    merges) render as in a full decode; tokens after `_read` are not emitted yet. A window whose text ends in
    U+FFFD is an incomplete multi-byte character, so it waits for the next token.

    The output text is defined over the output ids alone (not prompt + output): a streamed response equals a
    non-streamed `decode` of the same ids. `prompt_token_ids` is accepted for vLLM-shaped call sites but is
    not decode context for that reason.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], stop: tuple[str, ...] = (),
                 skip_special_tokens: bool = True) -> None:
        if any(not isinstance(s, str) or not s for s in stop):
            raise InvalidSamplingParams("stop", f"stop strings must be non-empty str, got {stop!r}")
        self._tokenizer = tokenizer
        self.num_prompt_tokens = len(prompt_token_ids)
        self._stop = tuple(stop)
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the decode window (context already emitted)
        self._read = 0  # end of what has been emitted
        self._held = ""  # decoded text that could still be the start of a stop string
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def num_output_tokens(self) -> int:
        return len(self._ids)

    def add(self, token_ids: Sequence[int]) -> DetokenizedDelta:
        """Append output ids; return the text they completed (after a stop, nothing more comes out)."""
        if self._stopped:
            return DetokenizedDelta("", True)
        self._ids.extend(token_ids)
        return self._release(self._decode_new(force=False))

    def finish(self) -> str:
        """Flush what is held (incomplete bytes as U+FFFD, stop-string candidates) when the sequence ends."""
        if self._stopped:
            return ""
        delta = self._release(self._decode_new(force=True), final=True)
        return delta.text

    def _decode_new(self, force: bool) -> str:
        if self._read == len(self._ids):
            return ""
        decode = self._tokenizer.decode
        prefix_text = decode(self._ids[self._prefix:self._read], skip_special_tokens=self._skip_special)
        new_text = decode(self._ids[self._prefix:], skip_special_tokens=self._skip_special)
        complete = len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT)
        if complete:
            self._prefix, self._read = self._read, len(self._ids)
            return new_text[len(prefix_text):]
        if force or len(self._ids) - self._read > _MAX_PENDING_TOKENS:
            # Give up waiting: emit as a full decode would (U+FFFD for broken bytes) and restart the window
            # here, since text ending in U+FFFD is no safe prefix for the next decode.
            self._prefix = self._read = len(self._ids)
            return new_text[len(prefix_text):]
        return ""

    def _release(self, text: str, final: bool = False) -> DetokenizedDelta:
        if not self._stop:
            return DetokenizedDelta(text, False)
        held = self._held + text
        hits = [i for i in (held.find(s) for s in self._stop) if i >= 0]
        if hits:
            self._stopped, self._held = True, ""
            return DetokenizedDelta(held[:min(hits)], True)
        keep = 0 if final else _longest_stop_prefix_suffix(held, self._stop)
        self._held = held[len(held) - keep:] if keep else ""
        return DetokenizedDelta(held[:len(held) - keep], False)


def _longest_stop_prefix_suffix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string (held back)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
