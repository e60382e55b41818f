"""Where KV goes: a decode worker's channel address, and one request's reserved blocks on it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class BlockSizing(Protocol):
    """Anything that knows how many blocks hold a number of tokens (KVLayout, KVCacheSpec)."""

    def num_blocks_for(self, num_tokens: int) -> int: ...


@dataclass(frozen=True)
class TransferTarget:
    request_id: str
    decode_id: str  # names the channel (prefill side keeps one channel per decode worker)
    block_ids: tuple[int, ...]  # reserved on the decode side, in block-table order
    num_tokens: int  # prompt tokens whose KV is sent

    def num_blocks(self, sizing: BlockSizing) -> int:
        """Blocks that carry `num_tokens` under `sizing`; the reservation must hold at least that many."""
        needed = sizing.num_blocks_for(self.num_tokens)
        if len(self.block_ids) < needed:
            raise ValueError(f"{self.request_id}: {self.num_tokens} tokens need {needed} blocks, "
                             f"the target reserved {len(self.block_ids)}")
        return needed


@dataclass(frozen=True)
class ChannelAddress:
    """The TCPStore a decode worker hosts for its KV channels; prefill workers connect to it."""

    host: str
    port: int
    decode_id: str
    # Names this process of the decode worker: a restarted worker listens anew, and peers holding a channel
    # to an older incarnation must connect again (deploy/supervisor.py compares these).
    incarnation: str = ""


# What a decode worker does when a prompt's KV transfer fails or its lease expires (--kv-failure-policy):
# "recompute" prefills the prompt on the decode worker itself; "fail" ends the request with the reason.
KV_FAILURE_POLICIES = ("recompute", "fail")
