"""OpenAI request bodies: scalar types checked strictly, unknown fields ignored as OpenAI does."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class _Body(BaseModel):
    # strict: "0.5" is not a number and true is not 1 (OpenAI answers both with 400); ints pass as floats.
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingBody(_Body):
    """The fields both endpoints share; their ranges are checked by router.validation, like gRPC's."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # not OpenAI's: vLLM's and SGLang's extension, also honoured here
    seed: int | None = None
    stop: Any = None  # a string or a list of strings: checked in mapping, so errors name the field plainly
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = None  # vLLM's extension
    stop_token_ids: list[int] | None = None  # vLLM's extension
    response_format: dict[str, Any] | None = None  # only {"type": "text"}: checked in mapping
    # Known to OpenAI, not honoured here: refused in mapping unless they hold their "off" value (0, {}, None).
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class CompletionRequest(_SamplingBody):
    prompt: Any  # a string or a list of token ids: checked in mapping
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None  # refused in mapping unless empty
    best_of: int | None = None  # refused in mapping unless 1


class ChatMessage(_Body):
    role: str
    content: Any = None  # a string or a list of {"type": "text", "text": ...} parts: checked in mapping


class ChatCompletionRequest(_SamplingBody):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None  # refused in mapping unless empty or tool_choice is "none"
    tool_choice: Any = None
    functions: list[Any] | None = None  # the deprecated spelling of tools
