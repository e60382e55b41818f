"""Which attention heads, kv heads, MLP columns and vocab rows a TP rank owns."""
from __future__ import annotations

from dataclasses import dataclass


class TPShapeError(ValueError):
    """The model's shapes cannot be split over this many ranks."""


def balanced_range(total: int, rank: int, size: int) -> range:
    """Rank's contiguous share of `total` items; the first total % size ranks get one more."""
    base, extra = divmod(total, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


@dataclass(frozen=True)
class HeadShard:
    """q_heads: the global query heads this rank computes; kv_heads: the global kv head behind each of the
    rank's local kv slots (a kv head may appear on several ranks: replicated, not split)."""

    q_heads: range
    kv_heads: tuple[int, ...]


def head_shard(num_heads: int, num_kv_heads: int, rank: int, size: int) -> HeadShard:
    """Split heads over `size` ranks; kv heads are replicated only where splitting them is impossible.

    size ≤ num_kv_heads: whole GQA groups per rank (balanced, so 3 kv heads on 2 ranks give 2 and 1 groups):
    no kv head is stored twice. size > num_kv_heads: query heads split (balanced) and each rank keeps the kv
    heads its query heads read; where its query heads do not read them equally often (the GQA ratio must be
    one number per rank), every local query head gets its own copy of its kv head.
    """
    if size > num_heads:
        raise TPShapeError(f"tensor parallel size {size} exceeds the model's {num_heads} attention heads")
    group = num_heads // num_kv_heads
    if size <= num_kv_heads:
        kv = balanced_range(num_kv_heads, rank, size)
        return HeadShard(range(kv.start * group, kv.stop * group), tuple(kv))
    q = balanced_range(num_heads, rank, size)
    owners = [h // group for h in q]
    distinct = sorted(set(owners))
    if all(owners.count(k) == len(q) // len(distinct) for k in distinct) and len(q) % len(distinct) == 0:
        return HeadShard(q, tuple(distinct))
    return HeadShard(q, tuple(owners))
