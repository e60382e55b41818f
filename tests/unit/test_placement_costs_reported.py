"""What conditional placement reads: the decode worker's reported transfers in flight and prefill pace, and
the router's notes of its own reservations between two reports."""
from __future__ import annotations

import asyncio

import pytest
from fakes import FakeDecodeClient, run

from contracts.sampling import SamplingParams
from contracts.stats import EngineStats
from decode_worker.api import ReserveRequest
from decode_worker.service import DecodeService
from engine.config import EngineConfig
from engine.step_cost import StepCostModel, with_placement_costs
from router.workers import DECODE, WorkerPool

pytestmark = pytest.mark.timeout(120)


def test_the_report_carries_the_step_cost_models_paces_for_the_batch_running_now() -> None:
    model = StepCostModel(1.5)
    model.observe(0, 400, 400 * 0.004)  # a prefill-only step
    for d in (1, 3):
        model.observe(d, 0, 0.03 * d)
        model.prefill_cap(d, 100)  # a prompt waits beside the batch: the next step paces it
        model.observe(d, 10, 0.03 * d + 0.05)
    stats = EngineStats(10, 10, num_running=4, num_waiting=0, queued_prefill_tokens=100)
    report = with_placement_costs(stats, model, awaiting_kv=1)  # 3 of its 4 run here, 1 awaits its KV
    assert report.num_awaiting_kv == 1 and report.prefill_s_per_token == pytest.approx(0.004)
    assert report.fused_prefill_s_per_token == pytest.approx((0.09 + 0.05) / 10)
    assert report.num_running == 4 and report.queued_prefill_tokens == 100
    bare = with_placement_costs(stats, None, awaiting_kv=0)  # split-fused off: nothing measured
    assert (bare.prefill_s_per_token, bare.fused_prefill_s_per_token) == (0.0, 0.0)


def test_a_decode_worker_reports_its_transfers_in_flight_and_the_pace_of_its_local_prefills() -> None:
    decode = DecodeService("decode-0", EngineConfig(model_path="random:tiny", device="cpu", block_size=4,
                                                    num_kv_blocks=64))
    sampling = SamplingParams(max_tokens=2, ignore_eos=True)

    async def scenario() -> tuple[EngineStats, EngineStats]:
        await decode.reserve(ReserveRequest("remote", tuple(range(1, 9)), sampling, prefill_locally=False))
        awaiting = (await decode.info()).stats
        await decode.reserve(ReserveRequest("local", tuple(range(1, 41)), sampling, prefill_locally=True))
        async for chunk in decode.stream("local"):
            if chunk.finish_reason is not None:
                break
        return awaiting, (await decode.info()).stats

    try:
        awaiting, after = asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        decode.shutdown()
    assert (awaiting.num_awaiting_kv, awaiting.num_running) == (1, 1)
    assert after.num_awaiting_kv == 1 and after.prefill_s_per_token > 0  # its 40-token prompt ran alone


def test_the_router_notes_a_local_prompts_tokens_and_a_remote_ones_transfer_until_the_next_report() -> None:
    async def body() -> None:
        pool = WorkerPool([], [FakeDecodeClient()])
        await pool.refresh()
        before = pool.ready(DECODE)[0].stats
        pool.note_reserved("decode-0", 0, prefill_locally=True, num_tokens=300)
        pool.note_reserved("decode-0", 5, prefill_locally=False, num_tokens=200)
        after = pool.ready(DECODE)[0].stats
        assert after.queued_prefill_tokens - before.queued_prefill_tokens == 300
        assert after.num_awaiting_kv - before.num_awaiting_kv == 1
        assert after.num_running - before.num_running == 1

    run(body())
