"""Where KV goes: a decode worker's channel address, and one request's reserved blocks on it."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TransferTarget:
    request_id: str
    decode_id: str  # names the channel (prefill side keeps one channel per decode worker)
    block_ids: tuple[int, ...]  # reserved on the decode side, in block-table order
    num_tokens: int  # prompt tokens whose KV is sent


@dataclass(frozen=True)
class ChannelAddress:
    """The TCPStore a decode worker hosts for its KV channels; prefill workers connect to it."""

    host: str
    port: int
    decode_id: str
