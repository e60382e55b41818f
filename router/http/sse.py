"""Server-sent events in OpenAI's streaming format: `data: {chunk}` events, then `data: [DONE]`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from proto.api import pb
from router.flow_errors import FlowError
from router.http.mapping import FINISH_REASONS, ResponseShape, flow_error_to_api

DONE = b"data: [DONE]\n\n"
Event = pb.GenerateResponse | FlowError


def sse_event(payload: dict[str, Any]) -> bytes:
    """One event; compact JSON, as OpenAI sends it (a JSON string never holds a raw newline)."""
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def sse_stream(
    shape: ResponseShape,
    first: Event,
    rest: AsyncIterator[Event],
    include_usage: bool,
    on_close: Callable[[], Awaitable[None]],
) -> AsyncIterator[bytes]:
    """The response body of a streamed request. `first` was read before the headers went out, so a request
    that fails before its first token got a real HTTP status. `on_close` runs however the body ends: normally,
    or cancelled because the client went away (which stops the flow and frees the request's blocks)."""
    usage_field: dict[str, Any] = {"usage": None} if include_usage else {}
    try:
        if shape.chat:  # OpenAI opens a chat stream with the assistant role and empty content
            yield sse_event({**shape.delta_chunk("", first=True), **usage_field})
        event: Event | None = first
        while event is not None:
            if isinstance(event, FlowError):  # mid-stream failure: the status line is gone, say it in-band
                yield sse_event(flow_error_to_api(event).body())
                break
            if event.HasField("delta"):
                if event.delta.text:  # a delta of token ids without text ends inside a UTF-8 character
                    yield sse_event({**shape.delta_chunk(event.delta.text), **usage_field})
            else:
                finish = FINISH_REASONS[event.final.finish_reason]
                yield sse_event({**shape.delta_chunk("", finish=finish), **usage_field})
                if include_usage:
                    yield sse_event(shape.usage_chunk(event.final))
                break
            event = await anext(rest, None)
        yield DONE
    finally:
        await on_close()
