"""How a request flow ends badly: the terminal FlowError its caller sees, the exceptions inside the flow."""

from __future__ import annotations

from dataclasses import dataclass

import grpc


@dataclass(frozen=True)
class FlowError:
    """Terminal event: the RPC ends with this status instead of a final message."""

    code: grpc.StatusCode
    message: str
    retry_after_s: float | None = None  # a hint for the client (full queue): gRPC trailer, HTTP Retry-After


class FlowFailure(Exception):
    """Ends the request with `code` (and `outcome` in the metrics); raised anywhere inside the flow."""

    def __init__(self, code: grpc.StatusCode, message: str, outcome: str) -> None:
        super().__init__(message)
        self.code, self.message, self.outcome = code, message, outcome


class DecodeLost(Exception):
    """The decode worker serving this attempt died (or its engine did): the request may migrate."""

    def __init__(self, worker_id: str, message: str) -> None:
        super().__init__(message)
        self.worker_id, self.message = worker_id, message
