"""The router-overhead bench's model-free workers behind the real router: every token arrives, stamped."""
from __future__ import annotations

import pytest

from bench.serving.fast_workers import FIRST_TOKEN, FastDecodeClient, FastPrefillClient
from proto.api import pb
from tests.unit.fakes import run, serve_router

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("step_s", [0.0, 0.001])
@pytest.mark.parametrize("local", [True, False])
def test_fast_worker_streams_every_token_through_the_router_and_stamps_each_once(step_s: float,
                                                                                  local: bool) -> None:
    async def body() -> tuple[list[int], dict[str, list[float]]]:
        decode = FastDecodeClient(step_s=step_s)
        placement = {"prefill_placement": "threshold", "local_prefill_max_tokens": 64 if local else 0}
        try:
            async with serve_router([FastPrefillClient(decode)], [decode], **placement) as h:
                request = pb.GenerateRequest(request_id="r", token_ids=pb.TokenIds(ids=[5, 6, 7]),
                                             sampling=pb.SamplingOptions(max_tokens=7, ignore_eos=True))
                ids = [i async for r in h.stub.Generate(request) if r.HasField("delta")
                       for i in r.delta.token_ids]
        finally:
            await decode.close()
        return ids, decode.emitted

    ids, emitted = run(body())
    assert ids == [FIRST_TOKEN + i for i in range(7)]
    assert len(emitted["r"]) == 7 and emitted["r"] == sorted(emitted["r"])


def test_a_step_of_several_tokens_goes_out_as_one_message_each_token_stamped() -> None:
    async def body() -> tuple[list[list[int]], dict[str, list[float]]]:
        decode = FastDecodeClient(step_s=0.001, tokens_per_step=3)
        try:
            async with serve_router([FastPrefillClient(decode)], [decode]) as h:
                request = pb.GenerateRequest(request_id="r", token_ids=pb.TokenIds(ids=[5]),
                                             sampling=pb.SamplingOptions(max_tokens=7, ignore_eos=True))
                deltas = [list(r.delta.token_ids) async for r in h.stub.Generate(request)
                          if r.HasField("delta")]
        finally:
            await decode.close()
        return deltas, decode.emitted

    deltas, emitted = run(body())
    assert deltas == [[FIRST_TOKEN + i for i in range(j, min(j + 3, 7))] for j in (0, 3, 6)]
    assert len(emitted["r"]) == 7


def test_quantiles_read_off_the_overhead_histogram_interpolate_within_a_bucket() -> None:
    from bench.serving.router_overhead import _cumulative, bucket_quantile, within

    # 98 deltas at 0.15 ms (bucket 0.1-0.2 ms), 2 at 3 ms (bucket 2.5-5 ms).
    buckets = _cumulative([0.00015] * 98 + [0.003] * 2)
    assert buckets[-1] == 100
    assert 0.0001 < bucket_quantile(buckets, 0.5) < 0.0002
    assert 0.0025 < bucket_quantile(buckets, 0.99) <= 0.005
    assert within(buckets, 0.001) == 0.98
    assert bucket_quantile(_cumulative([1.0]), 0.99) == 0.1  # past the last bound: that bound
