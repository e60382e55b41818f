"""Hands a remotely prefilled request's first token to its stream when its KV lands, even mid-step."""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from contracts.sampling import SamplingParams
from decode_worker.api import TokenChunk
from decode_worker.streams import RequestStream, deliver_all
from engine.detokenizer import DetokenizedDelta
from kv_transfer.receiver import KVReceiver
from kv_transfer.state import TransferState


@dataclass(frozen=True)
class _Awaiting:
    stream: RequestStream
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams


@dataclass(frozen=True)
class Admitted:
    """What admission still owes a request's first token: nothing if it already left (`sent`); else push
    it, with `delta` the detokenizer's answer if the landing already asked (it reached a stop string)."""

    sent: bool
    delta: DetokenizedDelta | None = None


class FirstTokenRelay:
    """The prefill worker sampled the first token and sent it with the last KV frame, so it needs no step:
    the thread that completes a transfer (the endpoint's reader, `landed`) hands it to the stream at once,
    while the engine thread may be inside a long step (a local prefill: all of it used to be TTFT).
    Admission (activation, block accounting) stays on the engine thread, which then skips the token.

    Exactness: a first token that ends the request (EOS, a stop token, max_tokens or the context reached)
    is left to admission, where the scheduler finishes it and frees its blocks; one that reaches a stop
    string is detokenized here but not sent, and admission finishes it with that answer. A migrated request
    (resumed tokens) goes the old way. One lock orders `landed` against `admit` and `forget` (abort,
    recompute, failure): whichever comes first wins, so a token is sent once and never after an abort."""

    def __init__(self, ends_at_first_token: Callable[[tuple[int, ...], SamplingParams, int], bool]) -> None:
        self._ends = ends_at_first_token  # the engine's stop rules (LLMEngine.ends_at_first_token)
        self._lock = threading.Lock()
        self._awaiting: dict[str, _Awaiting] = {}
        self._landed: dict[str, Admitted] = {}  # landed first, not yet admitted

    def expect(self, request_id: str, stream: RequestStream, prompt_token_ids: tuple[int, ...],
               sampling: SamplingParams, num_resumed_tokens: int) -> None:
        """Engine thread, at reservation: the request's KV will land here."""
        if num_resumed_tokens:
            return
        with self._lock:
            self._awaiting[request_id] = _Awaiting(stream, prompt_token_ids, sampling)

    def landed(self, receiver: KVReceiver) -> None:
        """Endpoint thread (the receiver's on_finish): send the first token now if it does not end the
        request."""
        if receiver.state is not TransferState.DONE or receiver.first_token_id is None:
            return
        request_id, token = receiver.target.request_id, receiver.first_token_id
        with self._lock:
            waiting = self._awaiting.pop(request_id, None)
            if waiting is None or self._ends(waiting.prompt_token_ids, waiting.sampling, token):
                return
            stream, delta = waiting.stream, None
            if stream.detok is not None:
                delta = stream.detok.add([token])
                if delta.stopped:
                    self._landed[request_id] = Admitted(False, delta)
                    return
            stream.num_output_tokens = 1
            chunk = TokenChunk(request_id, (token,), delta.text if delta else "", None,
                               len(waiting.prompt_token_ids), 1)
            stream.loop.call_soon_threadsafe(deliver_all, [(stream, chunk)])
            self._landed[request_id] = Admitted(True)

    def admit(self, request_id: str) -> Admitted:
        """Engine thread, activating the request: what its first token still needs."""
        with self._lock:
            self._awaiting.pop(request_id, None)  # not landed yet as far as `landed` knows: too late now
            return self._landed.pop(request_id, Admitted(False))

    def forget(self, request_id: str | None = None) -> None:
        """Engine thread: the request (None: every one) ends or is prefilled here; send nothing for it."""
        with self._lock:
            if request_id is None:
                self._awaiting.clear()
                self._landed.clear()
            else:
                self._awaiting.pop(request_id, None)
                self._landed.pop(request_id, None)
