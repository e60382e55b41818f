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
    num_tokens: int  # prompt tokens whose KV the decode side holds once the transfer is done
    # Block-aligned token index the transfer starts at: the decode side found the tokens before it in its
    # prefix cache, so only the blocks from here on travel (block_ids still lists the whole prompt's blocks).
    start_token: int = 0

    def first_block(self, sizing: BlockSizing) -> int:
        """Index in block_ids of the first block that travels."""
        return sizing.num_blocks_for(self.start_token) if self.start_token > 0 else 0

    def num_blocks(self, sizing: BlockSizing) -> int:
        """Blocks that travel: those holding tokens start_token .. num_tokens - 1 under `sizing`; the
        reservation must hold every block up to the last of them."""
        needed = sizing.num_blocks_for(self.num_tokens)
        if len(self.block_ids) < needed:
            raise ValueError(f"{self.request_id}: {self.num_tokens} tokens need {needed} blocks, "
                             f"the target reserved {len(self.block_ids)}")
        first = self.first_block(sizing)
        if not 0 <= first < needed or sizing.num_blocks_for(self.start_token + 1) != first + 1:
            raise ValueError(f"{self.request_id}: start_token {self.start_token} is not a block boundary "
                             f"before the last of {self.num_tokens} tokens")
        return needed - first


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
