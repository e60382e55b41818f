"""Where a prefill worker must put one request's KV: the decode worker's channel and the blocks it reserved."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TransferTarget:
    request_id: str
    decode_id: str  # names the channel (prefill side keeps one channel per decode worker)
    block_ids: tuple[int, ...]  # reserved on the decode side, in block-table order
    num_tokens: int  # prompt tokens whose KV is sent
