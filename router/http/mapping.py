"""OpenAI <-> router: bodies onto GenerateInput, errors onto OpenAI's error body, results onto responses."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
from pydantic import ValidationError

from proto.api import pb
from router.flow_errors import FlowError
from router.http.schemas import ChatCompletionRequest, CompletionRequest
from router.validation import ChatMessage, GenerateInput, InvalidRequest

RETRY_AFTER_S = 1  # a full queue drains in about a request's time; clients back off and retry
FINISH_REASONS = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",  # not OpenAI's: the request was aborted (Abort RPC, shutdown)
}
_STATUS = {  # a flow's terminal gRPC status -> HTTP status and OpenAI error type
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}


class ApiError(Exception):
    """Becomes an HTTP response with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # noqa: A002  (OpenAI's name for it)
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(param: str | None, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}" if param else message, param=param)


def parse_body(raw: bytes, model: type[CompletionRequest] | type[ChatCompletionRequest]) -> Any:
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        first = e.errors()[0]
        if first["type"] == "json_invalid":
            raise bad_request(None, f"the body is not valid JSON ({first['msg']})") from None
        param = _param(first["loc"])
        raise bad_request(param or None, first["msg"] if param else f"the body: {first['msg']}") from None


def _param(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# -- request -> GenerateInput -------------------------------------------------------------------------------
def completion_input(body: CompletionRequest, request_id: str) -> GenerateInput:
    if body.echo:
        raise bad_request("echo", "echoing the prompt is not supported")
    if body.logprobs is not None:
        raise bad_request("logprobs", "log probabilities are not supported")
    if body.suffix:
        raise bad_request("suffix", "insertion (a suffix after the completion) is not supported")
    if body.best_of is not None and body.best_of != 1:
        raise bad_request("best_of", f"only best_of=1 is supported, got {body.best_of}")
    prompt = body.prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one, as LangChain and other batching clients send every prompt
    text, token_ids = None, None
    if isinstance(prompt, str):
        text = prompt
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        token_ids = tuple(prompt)
    else:
        raise bad_request("prompt", "must be a string or a list of token ids (one prompt per request)")
    return _input(body, request_id, body.max_tokens, text=text, token_ids=token_ids)


def chat_input(body: ChatCompletionRequest, request_id: str) -> GenerateInput:
    if body.logprobs:
        raise bad_request("logprobs", "log probabilities are not supported")
    if body.top_logprobs:  # OpenAI refuses it without logprobs too; silently ignoring it would be a lie
        raise bad_request("top_logprobs", "log probabilities are not supported")
    if (body.tools or body.functions) and body.tool_choice != "none":
        field_name = "tools" if body.tools else "functions"
        raise bad_request(field_name, 'tool calls are not supported (tool_choice "none" answers in text)')
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise bad_request("max_completion_tokens", "set max_completion_tokens or max_tokens, not both")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    chat = tuple(
        ChatMessage(_role(m.role), _content(m.content, f"messages[{i}].content"))
        for i, m in enumerate(body.messages)
    )
    return _input(body, request_id, max_tokens, chat=chat)


def _role(role: str) -> str:
    return "system" if role == "developer" else role  # OpenAI's newer name for system instructions


def _content(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            is_text = isinstance(part, dict) and part.get("type") == "text"
            if not (is_text and isinstance(part.get("text"), str)):
                raise bad_request(f"{param}[{i}]", 'only {"type": "text", "text": "..."} parts are supported')
            texts.append(part["text"])
        return "".join(texts)
    raise bad_request(param, "must be a string or a list of text parts")


def _stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise bad_request("stop", "must be a string or a list of strings")


def _input(
    body: CompletionRequest | ChatCompletionRequest, request_id: str, max_tokens: int | None, **prompt: Any
) -> GenerateInput:
    if body.n is not None and body.n != 1:
        raise bad_request("n", f"only n=1 is supported, got {body.n}")
    if body.stream_options is not None and not body.stream:  # as OpenAI and vLLM answer it
        raise bad_request("stream_options", "only allowed with stream: true")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(body, name):  # 0 is OpenAI's "off"; anything else would change the tokens we can't change
            raise bad_request(name, "penalties are not supported (only 0)")
    if body.logit_bias and any(body.logit_bias.values()):  # biases of 0 change nothing
        raise bad_request("logit_bias", "biasing token logits is not supported")
    if body.response_format is not None and body.response_format.get("type") != "text":
        raise bad_request("response_format", 'only {"type": "text"} is supported (no JSON mode or schema)')
    return GenerateInput(
        request_id=request_id,
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=None if body.top_k == -1 else body.top_k,  # -1: vLLM's spelling of "off", like 0
        seed=body.seed,
        stop=_stop(body.stop),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=bool(body.ignore_eos),
        **prompt,
    )


def invalid_to_api(e: InvalidRequest, body: CompletionRequest | ChatCompletionRequest) -> ApiError:
    """router.validation names GenerateRequest's fields; say them as the OpenAI body spells them."""
    chat = isinstance(body, ChatCompletionRequest)
    name = e.field.removeprefix("sampling.")
    if name == "max_tokens" and chat and body.max_completion_tokens is not None:
        name = "max_completion_tokens"
    elif name.startswith("stop[") and isinstance(body.stop, str):
        name = "stop"
    elif name in ("input", "chat"):
        name = "messages" if chat else "prompt"
    else:
        name = re.sub(r"^(text|token_ids)", "prompt", name)
        name = name.removeprefix("chat.")
    return bad_request(name, e.message)


def flow_error_to_api(error: FlowError) -> ApiError:
    status, kind = _STATUS.get(error.code, (500, "server_error"))
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 429 else {}
    return ApiError(status, error.message, type=kind, code=error.code.name.lower(), headers=headers)


# -- results -> OpenAI responses ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ResponseShape:
    """What every response and chunk of one request shares."""

    id: str
    model: str
    chat: bool
    created: int = field(default_factory=lambda: int(time.time()))

    def envelope(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def completion(self, text: str, final: pb.FinalResult) -> dict[str, Any]:
        reason = FINISH_REASONS[final.finish_reason]
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "logprobs": None}
        choices = [{**choice, "finish_reason": reason}]
        return {**self.envelope(False), "choices": choices, "usage": usage(final)}

    def delta_chunk(self, text: str, first: bool = False, finish: str | None = None) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
            choice = {"index": 0, "delta": delta if text or first else {}, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "logprobs": None}
        return {**self.envelope(True), "choices": [{**choice, "finish_reason": finish}]}

    def usage_chunk(self, final: pb.FinalResult) -> dict[str, Any]:
        return {**self.envelope(True), "choices": [], "usage": usage(final)}


def usage(final: pb.FinalResult) -> dict[str, int]:
    p, c = final.usage.prompt_tokens, final.usage.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
