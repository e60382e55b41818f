"""GenerateRequest -> ValidatedRequest (token ids + SamplingParams), or InvalidRequest naming the field."""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Protocol

from contracts.sampling import InvalidSamplingParams, SamplingParams
from engine.tokenizer import TokenizerError
from proto.api import pb

CHAT_ROLES = ("system", "user", "assistant")


class Tokenizer(Protocol):
    """What the router needs from engine.tokenizer.Tokenizer."""

    vocab_size: int
    eos_token_ids: tuple[int, ...]

    def encode(self, text: str) -> list[int]: ...

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]: ...


class InvalidRequest(ValueError):
    """A request field is unusable; `field` names it (becomes INVALID_ARGUMENT "field: message")."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


@dataclass(frozen=True)
class ValidatedRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams


@dataclass(frozen=True)
class ValidationLimits:
    context_length: int  # prompt + max_tokens must fit
    vocab_size: int  # token ids must lie in [0, vocab_size)
    default_max_tokens: int
    max_request_id_len: int


def new_request_id() -> str:
    return uuid.uuid4().hex


def validate_request(
    request: pb.GenerateRequest, tokenizer: Tokenizer, limits: ValidationLimits
) -> ValidatedRequest:
    request_id = _request_id(request.request_id, limits.max_request_id_len)
    prompt = _prompt_token_ids(request, tokenizer, limits.vocab_size)
    sampling = _sampling(request.sampling, len(prompt), limits)
    return ValidatedRequest(request_id=request_id, prompt_token_ids=prompt, sampling=sampling)


def _request_id(request_id: str, max_len: int) -> str:
    if not request_id:
        return new_request_id()
    if len(request_id) > max_len:
        raise InvalidRequest("request_id", f"at most {max_len} characters, got {len(request_id)}")
    if not request_id.isprintable():
        raise InvalidRequest("request_id", "must be printable characters only")
    return request_id


def _prompt_token_ids(request: pb.GenerateRequest, tokenizer: Tokenizer, vocab_size: int) -> tuple[int, ...]:
    kind = request.WhichOneof("input")
    if kind is None:
        raise InvalidRequest("input", "set one of text, token_ids or chat")
    if kind == "text":
        if not request.text:
            raise InvalidRequest("text", "must not be empty")
        ids = tokenizer.encode(request.text)
    elif kind == "token_ids":
        ids = list(request.token_ids.ids)
        if not ids:
            raise InvalidRequest("token_ids", "must not be empty")
        for i, tok in enumerate(ids):
            if not 0 <= tok < vocab_size:
                raise InvalidRequest(f"token_ids[{i}]", f"{tok} is outside the vocabulary [0, {vocab_size})")
    else:
        messages = request.chat.messages
        if not messages:
            raise InvalidRequest("chat", "needs at least one message")
        for i, m in enumerate(messages):
            if m.role not in CHAT_ROLES:
                raise InvalidRequest(
                    f"chat.messages[{i}].role", f"{m.role!r} is not one of {', '.join(CHAT_ROLES)}"
                )
        try:
            ids = tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages])
        except TokenizerError as e:  # the model's template rejected the conversation (e.g. role order)
            raise InvalidRequest("chat", f"the model's chat template rejected it: {e}") from None
    if not ids:
        # Text that encodes to nothing (the tokenizer dropped it all) is as useless as an empty prompt.
        raise InvalidRequest(kind, "encodes to zero tokens")
    return tuple(int(t) for t in ids)


def _sampling(opts: pb.SamplingOptions, num_prompt: int, limits: ValidationLimits) -> SamplingParams:
    room = limits.context_length - num_prompt
    if room < 1:
        raise InvalidRequest(
            "input",
            f"prompt has {num_prompt} tokens; the context window is "
            f"{limits.context_length}, leaving no room for output",
        )
    if opts.HasField("max_tokens"):
        max_tokens = opts.max_tokens
        if max_tokens < 1:
            raise InvalidRequest("sampling.max_tokens", f"must be >= 1, got {max_tokens}")
        if max_tokens > room:
            raise InvalidRequest(
                "sampling.max_tokens",
                f"prompt ({num_prompt} tokens) + max_tokens ({max_tokens}) "
                f"exceeds the context window of {limits.context_length}",
            )
    else:
        # An unset max_tokens means "the default, as far as the context allows", never an error.
        max_tokens = min(limits.default_max_tokens, room)
    for name in ("temperature", "top_p"):
        if opts.HasField(name) and not math.isfinite(getattr(opts, name)):
            raise InvalidRequest(f"sampling.{name}", "must be a finite number")
    for i, s in enumerate(opts.stop):
        if not s:
            raise InvalidRequest(f"sampling.stop[{i}]", "must not be empty")
    for i, tok in enumerate(opts.stop_token_ids):
        if not 0 <= tok < limits.vocab_size:
            raise InvalidRequest(
                f"sampling.stop_token_ids[{i}]", f"{tok} is outside the vocabulary [0, {limits.vocab_size})"
            )
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=opts.temperature if opts.HasField("temperature") else 0.0,
            top_p=opts.top_p if opts.HasField("top_p") else 1.0,
            top_k=opts.top_k if opts.HasField("top_k") else 0,
            seed=opts.seed if opts.HasField("seed") else None,
            stop=tuple(opts.stop),
            stop_token_ids=tuple(int(t) for t in opts.stop_token_ids),
            ignore_eos=opts.ignore_eos,
        )
    except InvalidSamplingParams as e:
        raise InvalidRequest(f"sampling.{e.field}", str(e).split(": ", 1)[-1]) from None
