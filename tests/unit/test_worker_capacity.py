"""A decode worker's NoCapacity names the limit it hit (sequence slots or KV blocks); info reports both."""
from __future__ import annotations

import asyncio

import pytest

from contracts.sampling import SamplingParams
from decode_worker.api import NoCapacity, ReserveRequest
from decode_worker.service import DecodeService
from engine.config import EngineConfig

pytestmark = pytest.mark.timeout(120)

SAMPLING = SamplingParams(max_tokens=4, ignore_eos=True)


def test_no_capacity_says_whether_slots_or_blocks_ran_out() -> None:
    config = EngineConfig(
        model_path="random:tiny", device="cpu", block_size=4, num_kv_blocks=4, max_num_seqs=2
    )
    decode = DecodeService("decode-0", config)
    try:
        async def scenario() -> None:
            await decode.reserve(ReserveRequest("a", (1, 2, 3, 4, 5), SAMPLING))  # 2 of 4 blocks
            blocks = r"decode-0: no room for 9 prompt tokens: 3 KV blocks needed, 2 free"
            with pytest.raises(NoCapacity, match=blocks):
                await decode.reserve(ReserveRequest("b", tuple(range(1, 10)), SAMPLING))
            await decode.reserve(ReserveRequest("c", (1, 2), SAMPLING))
            with pytest.raises(NoCapacity, match=r"all 2 sequence slots \(max_num_seqs\) are taken"):
                await decode.reserve(ReserveRequest("d", (1,), SAMPLING))
            stats = (await decode.info()).stats
            assert (stats.max_num_seqs, stats.num_free_seqs, stats.num_free_blocks) == (2, 0, 1)

        asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        decode.shutdown()
