"""The actor-side ends of token streams: one request's queue, and a consumer's batched, multiplexed stream."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from decode_worker.api import TokenChunk
from engine.detokenizer import IncrementalDetokenizer


@dataclass
class Subscriber:
    """One consumer's multiplexed stream (a router): chunks of every request attached to it, taken as one
    batch per wake-up; a step's chunks arrive in one callback (`deliver_all`), so N streams cost one item."""

    pending: list[TokenChunk] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    requests: set[str] = field(default_factory=set)

    def put(self, chunk: TokenChunk) -> None:
        self.pending.append(chunk)
        self.ready.set()


@dataclass
class RequestStream:
    """The actor-side end of one request's token stream; the engine thread's chunks reach it through
    `DecodeService._push` / `_flush`. They queue here until a consumer takes them: `DecodeService.stream()`
    per request, or a subscriber once attached."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    detok: IncrementalDetokenizer | None
    num_prompt_tokens: int
    num_output_tokens: int = 0  # as of the last chunk pushed (engine thread)
    subscriber: Subscriber | None = None  # actor loop only

    def deliver(self, chunk: TokenChunk) -> None:
        """On the actor loop: to the subscriber if attached, else queued for `stream()` or a later attach."""
        if self.subscriber is not None:
            self.subscriber.put(chunk)
        else:
            self.queue.put_nowait(chunk)

    def flush_text(self) -> str:
        """Text the detokenizer held back (a possible stop-string prefix), released when the sequence ends."""
        return self.detok.finish() if self.detok is not None else ""


def deliver_all(batch: list[tuple[RequestStream, TokenChunk]]) -> None:
    """On the actor loop: one engine step's (or command's) chunks, before any consumer task runs again."""
    for stream, chunk in batch:
        stream.deliver(chunk)
