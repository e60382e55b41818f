"""Both doors' requests -> ValidatedRequest or InvalidRequest naming the field."""

from __future__ import annotations

import asyncio
import math
import uuid
from dataclasses import dataclass
from typing import Protocol

from contracts.sampling import InvalidSamplingParams, SamplingParams
from engine.tokenizer import TokenizerError
from proto.api import pb

CHAT_ROLES = ("system", "user", "assistant")
# Prompts of more characters are tokenized off the event loop: a few MB take a second or more, and the
# tokenizer releases the GIL (engine.tokenizer), so every other request's stream keeps flowing meanwhile.
OFF_LOOP_PROMPT_CHARS = 32 * 1024


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
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class GenerateInput:
    """A generate request as a door received it, before validation: exactly one of text, token_ids and chat;
    None = unset. Error fields are named as in GenerateRequest (`sampling.top_p`); a door renames them."""

    request_id: str = ""
    text: str | None = None
    token_ids: tuple[int, ...] | None = None
    chat: tuple[ChatMessage, ...] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class ValidationLimits:
    context_length: int  # prompt + max_tokens must fit
    vocab_size: int  # token ids must lie in [0, vocab_size)
    default_max_tokens: int
    max_request_id_len: int
    max_stop_strings: int = 32
    max_stop_chars: int = 256
    max_stop_token_ids: int = 256


def new_request_id() -> str:
    return uuid.uuid4().hex


def validate_request(
    request: pb.GenerateRequest, tokenizer: Tokenizer, limits: ValidationLimits
) -> ValidatedRequest:
    """The gRPC door: GenerateRequest -> GenerateInput -> the shared validation."""
    return validate(input_from_proto(request), tokenizer, limits)


def input_from_proto(request: pb.GenerateRequest) -> GenerateInput:
    kind = request.WhichOneof("input")
    opts = request.sampling

    def opt(name: str) -> float | int | None:
        return getattr(opts, name) if opts.HasField(name) else None

    return GenerateInput(
        request_id=request.request_id,
        text=request.text if kind == "text" else None,
        token_ids=tuple(request.token_ids.ids) if kind == "token_ids" else None,
        chat=tuple(ChatMessage(m.role, m.content) for m in request.chat.messages) if kind == "chat" else None,
        max_tokens=opt("max_tokens"),  # type: ignore[arg-type]
        temperature=opt("temperature"),
        top_p=opt("top_p"),
        top_k=opt("top_k"),  # type: ignore[arg-type]
        seed=opt("seed"),  # type: ignore[arg-type]
        stop=tuple(opts.stop),
        stop_token_ids=tuple(int(t) for t in opts.stop_token_ids),
        ignore_eos=opts.ignore_eos,
    )


def input_to_proto(request: GenerateInput) -> pb.GenerateRequest:
    """input_from_proto's inverse: what a client (`pdserve generate`) sends; None fields stay unset."""
    sampling = pb.SamplingOptions(stop=list(request.stop), stop_token_ids=list(request.stop_token_ids),
                                  ignore_eos=request.ignore_eos)
    for name in ("max_tokens", "temperature", "top_p", "top_k", "seed"):
        value = getattr(request, name)
        if value is not None:
            setattr(sampling, name, value)
    out = pb.GenerateRequest(request_id=request.request_id, sampling=sampling)
    if request.text is not None:
        out.text = request.text
    elif request.token_ids is not None:
        out.token_ids.ids.extend(request.token_ids)
    elif request.chat is not None:
        out.chat.messages.extend(pb.ChatMessage(role=m.role, content=m.content) for m in request.chat)
    return out


async def validate_off_loop(
    request: GenerateInput, tokenizer: Tokenizer, limits: ValidationLimits
) -> ValidatedRequest:
    """validate(), in a worker thread when the prompt is long enough to stall the doors' event loop."""
    chars = len(request.text or "") + sum(len(m.content) for m in request.chat or ())
    if chars < OFF_LOOP_PROMPT_CHARS:
        return validate(request, tokenizer, limits)
    return await asyncio.to_thread(validate, request, tokenizer, limits)


def validate(request: GenerateInput, tokenizer: Tokenizer, limits: ValidationLimits) -> ValidatedRequest:
    """Every door's one validation: request id, prompt tokens, sampling within the model's limits."""
    request_id = _request_id(request.request_id, limits.max_request_id_len)
    prompt = _prompt_token_ids(request, tokenizer, limits.vocab_size)
    sampling = _sampling(request, len(prompt), limits)
    return ValidatedRequest(request_id=request_id, prompt_token_ids=prompt, sampling=sampling)


def _request_id(request_id: str, max_len: int) -> str:
    if not request_id:
        return new_request_id()
    if len(request_id) > max_len:
        raise InvalidRequest("request_id", f"at most {max_len} characters, got {len(request_id)}")
    if not request_id.isprintable():
        raise InvalidRequest("request_id", "must be printable characters only")
    return request_id


def _prompt_token_ids(request: GenerateInput, tokenizer: Tokenizer, vocab_size: int) -> tuple[int, ...]:
    given = [k for k in ("text", "token_ids", "chat") if getattr(request, k) is not None]
    if len(given) != 1:
        raise InvalidRequest("input", "set exactly one of text, token_ids or chat")
    (kind,) = given
    if request.text is not None:
        if not request.text:
            raise InvalidRequest("text", "must not be empty")
        ids = tokenizer.encode(request.text)
    elif request.token_ids is not None:
        ids = list(request.token_ids)
        if not ids:
            raise InvalidRequest("token_ids", "must not be empty")
        for i, tok in enumerate(ids):
            if not 0 <= tok < vocab_size:
                raise InvalidRequest(f"token_ids[{i}]", f"{tok} is outside the vocabulary [0, {vocab_size})")
    else:
        messages = request.chat or ()
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


def _sampling(request: GenerateInput, num_prompt: int, limits: ValidationLimits) -> SamplingParams:
    room = limits.context_length - num_prompt
    if room < 1:
        raise InvalidRequest(
            "input",
            f"prompt has {num_prompt} tokens; the context window is "
            f"{limits.context_length}, leaving no room for output",
        )
    max_tokens = request.max_tokens
    if max_tokens is not None:
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
        value = getattr(request, name)
        if value is not None and not math.isfinite(value):
            raise InvalidRequest(f"sampling.{name}", "must be a finite number")
    if request.seed is not None and not 0 <= request.seed < 2**64:
        raise InvalidRequest("sampling.seed", f"must be in [0, 2**64), got {request.seed}")
    # Every stop string is matched against the text after each token: bound the work one request can ask for.
    if len(request.stop) > limits.max_stop_strings:
        raise InvalidRequest(
            "sampling.stop", f"at most {limits.max_stop_strings} stop strings, got {len(request.stop)}"
        )
    for i, s in enumerate(request.stop):
        if not s:
            raise InvalidRequest(f"sampling.stop[{i}]", "must not be empty")
        if len(s) > limits.max_stop_chars:
            raise InvalidRequest(
                f"sampling.stop[{i}]", f"at most {limits.max_stop_chars} characters, got {len(s)}"
            )
    if len(request.stop_token_ids) > limits.max_stop_token_ids:
        raise InvalidRequest(
            "sampling.stop_token_ids",
            f"at most {limits.max_stop_token_ids} stop token ids, got {len(request.stop_token_ids)}",
        )
    for i, tok in enumerate(request.stop_token_ids):
        if not 0 <= tok < limits.vocab_size:
            raise InvalidRequest(
                f"sampling.stop_token_ids[{i}]", f"{tok} is outside the vocabulary [0, {limits.vocab_size})"
            )
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=0.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            top_k=0 if request.top_k is None else request.top_k,
            seed=request.seed,
            stop=request.stop,
            stop_token_ids=request.stop_token_ids,
            ignore_eos=request.ignore_eos,
        )
    except InvalidSamplingParams as e:
        raise InvalidRequest(f"sampling.{e.field}", str(e).split(": ", 1)[-1]) from None
