"""Stopping the router drains running streams on both doors for the grace period, then aborts the rest."""

from __future__ import annotations

import asyncio
import json

import grpc
import httpx
import pytest
from fakes import FAKE_MODEL, fake_cluster, run, serve_router

from proto.api import pb

pytestmark = pytest.mark.timeout(60)


def test_running_streams_finish_within_the_grace_period() -> None:
    async def body() -> tuple[pb.GenerateResponse, str]:
        prefill, decode = fake_cluster(step_delay_s=0.05)
        async with serve_router(prefill, decode, http_port=0) as h:
            call = h.stub.Generate(pb.GenerateRequest(text="hi", sampling=pb.SamplingOptions(max_tokens=12)))
            first = await call.read()
            assert first.HasField("delta")
            url = f"http://127.0.0.1:{h.server.http_port}/v1/completions"
            req = {"model": FAKE_MODEL.model_name, "prompt": "hi", "max_tokens": 12, "stream": True}
            async with httpx.AsyncClient(timeout=10) as client, client.stream("POST", url, json=req) as r:
                lines = r.aiter_lines()
                assert (await anext(lines)).startswith("data: ")
                stopping = asyncio.create_task(h.server.stop(grace=5.0))
                items = [first]
                while (item := await call.read()) is not grpc.aio.EOF:
                    items.append(item)
                tail = [line async for line in lines]
            await stopping
            assert len(decode[0].free_blocks) == decode[0].num_total_blocks
        return items[-1], "\n".join(tail)

    final, sse = run(body(), timeout_s=20)
    assert final.final.finish_reason == pb.FINISH_REASON_LENGTH and final.final.usage.completion_tokens == 12
    assert sse.rstrip().endswith("data: [DONE]")
    last = json.loads([ln for ln in sse.splitlines() if ln.startswith("data: {")][-1][6:])
    assert last["choices"][0]["finish_reason"] == "length"


def test_streams_past_the_grace_period_are_aborted_and_new_requests_refused() -> None:
    async def body() -> tuple[grpc.StatusCode, grpc.StatusCode]:
        prefill, decode = fake_cluster(step_delay_s=0.2)
        async with serve_router(prefill, decode) as h:
            call = h.stub.Generate(pb.GenerateRequest(text="hi", sampling=pb.SamplingOptions(max_tokens=100)))
            await call.read()
            stopping = asyncio.create_task(h.server.stop(grace=0.3))
            await asyncio.sleep(0.1)
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await h.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=2)
            with pytest.raises(grpc.aio.AioRpcError) as cut:
                while await call.read() is not grpc.aio.EOF:
                    pass
            await stopping
            assert decode[0].abort_calls  # the workers were told: the blocks come back
            assert len(decode[0].free_blocks) == decode[0].num_total_blocks
        return late.value.code(), cut.value.code()

    late, cut = run(body(), timeout_s=20)
    assert late == grpc.StatusCode.UNAVAILABLE
    assert cut in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED)
