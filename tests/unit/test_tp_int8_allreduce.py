"""8-bit all-reduce on 2 gloo ranks: within its error bound of fp32's, ≤ 0.53x the bytes of bf16."""
import torch

from engine.tp.comm import INT8_BLOCK, TPComm, ring_all_reduce_bytes
from engine.tp.group import TPGroup
from engine.tp.int8_allreduce import QMAX, padded_length
from engine.tp.local_ranks import run_local_ranks

BLOCK = INT8_BLOCK  # what workers run


def _inputs(rank: int, numel: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(numel, generator=gen) * (1 + rank)
    x[: numel // 7] *= 50.0  # outlier stretches: blocks with very different scales
    return x


def _reduce(group: TPGroup, sizes: tuple[int, ...]) -> list[dict]:
    return [_reduce_one(group, numel) for numel in sizes]


def _reduce_one(group: TPGroup, numel: int) -> dict:
    x = _inputs(group.rank, numel)
    exact = x.clone()
    comm = TPComm(group, "bf16")
    comm.all_reduce(exact)
    q = x.clone().view(-1, 3) if numel % 3 == 0 else x.clone()
    int8 = TPComm(group, "int8", BLOCK)
    int8.all_reduce(q)
    return {"exact": exact, "int8": q.reshape(-1), "bytes": int8.stats.bytes_sent}


def _bound(numel: int, world: int) -> torch.Tensor:
    """Σ_r s_r/2 + s_sum/2 per element, s = block absmax / 127, blocks of the padded flat message."""
    m = padded_length(numel, world, BLOCK)
    xs = [torch.nn.functional.pad(_inputs(r, numel), (0, m - numel)).view(-1, BLOCK) for r in range(world)]
    per_rank = sum(x.abs().amax(1) for x in xs) / QMAX / 2
    # The sum's scale is bounded by the sum of the ranks' absmaxes (the requantized block's absmax).
    total = per_rank + sum(x.abs().amax(1) for x in xs) / QMAX / 2
    # Scales travel as one-byte powers of 2^(1/8), rounded up: each is at most 2^(1/8) times the exact one.
    return total.repeat_interleave(BLOCK)[:numel] * 2 ** (1 / 8) + 1e-5


def test_int8_all_reduce_within_bound_and_bytes():
    sizes = (3 * 1000, 4096 * 2)
    per_rank = run_local_ranks(_reduce, 2, sizes)
    for i, numel in enumerate(sizes):
        results = [rank[i] for rank in per_rank]
        bound = _bound(numel, 2)
        for r in results:
            err = (r["int8"] - r["exact"]).abs()
            assert torch.all(err <= bound), float((err - bound).max())
            assert err.max() > 0  # it did go through int8
        assert torch.equal(results[0]["int8"], results[1]["int8"])  # every rank ends with the same sum
        bf16_bytes = ring_all_reduce_bytes(numel, 2, 2)
        if numel % (2 * BLOCK) == 0:  # no padding: the format's own ratio
            assert results[0]["bytes"] <= 0.53 * bf16_bytes
