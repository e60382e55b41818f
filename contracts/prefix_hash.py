"""Prefix-cache block hashes: each full block's hash chains its parent's, so equal hashes mean equal prefixes.

Torch-free and process-independent (blake2b, not Python's salted hash): the router hashes a prompt with the
same function the workers use to name their cached blocks.
"""
from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

ROOT_HASH = 0  # the parent of a prompt's first block


def hash_block(parent: int, token_ids: Sequence[int]) -> int:
    """The hash of one full block of tokens that follows the block hashed `parent`."""
    h = hashlib.blake2b(parent.to_bytes(8, "little"), digest_size=8)
    h.update(array("q", token_ids).tobytes())
    return int.from_bytes(h.digest(), "little")


def extend_block_hashes(hashes: list[int], token_ids: Sequence[int], block_size: int,
                        num_blocks: int | None = None) -> list[int]:
    """Append to `hashes` (the chain of the first len(hashes) blocks) the hashes of further full blocks of
    `token_ids`, up to `num_blocks` blocks in all (default: every full block); returns `hashes`."""
    full = len(token_ids) // block_size
    end = full if num_blocks is None else min(full, num_blocks)
    parent = hashes[-1] if hashes else ROOT_HASH
    for i in range(len(hashes), end):
        parent = hash_block(parent, token_ids[i * block_size:(i + 1) * block_size])
        hashes.append(parent)
    return hashes


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """The chained hashes of every full block of `token_ids`."""
    return extend_block_hashes([], token_ids, block_size)
