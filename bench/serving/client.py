"""The async gRPC runner: sends requests open-loop at their offsets over streaming Generate, times each."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from tqdm import tqdm

from bench.serving.loopback import check_loopback
from bench.serving.workload import BenchRequest
from proto.api import pb, pb_grpc

CANCELLED_AT_STOP = "CANCELLED_AT_STOP"  # still streaming when the run's time bound ran out
NO_FINAL = "NO_FINAL"  # the stream ended without its final message


@dataclass(frozen=True)
class RequestRecord:
    """One request's timings in seconds: ttft to the first token delta, tpot over the tokens after it."""
    index: int
    warmup: bool
    sent_at: float  # from the run's start
    status: str  # "OK", a grpc status code name, CANCELLED_AT_STOP or NO_FINAL
    prompt_tokens: int
    output_tokens: int
    ttft: float | None  # None: no token arrived
    tpot: float | None  # None: fewer than two tokens arrived
    e2e: float  # to the final message (or the error, or the stop)
    max_itl: float | None  # the longest gap between two token deltas


@dataclass(frozen=True)
class RunLimits:
    max_seconds: float
    warmup: int = 0  # the first `warmup` requests of the schedule are marked and left out of the stats
    progress: bool = True


@dataclass(frozen=True)
class RunResult:
    records: tuple[RequestRecord, ...]
    not_sent: int  # scheduled after the time bound
    wall_seconds: float


def build_request(req: BenchRequest) -> pb.GenerateRequest:
    # ignore_eos: the output length is the workload's, not the model's whim.
    sampling = pb.SamplingOptions(max_tokens=req.max_tokens, ignore_eos=True)
    if req.text is not None:
        return pb.GenerateRequest(text=req.text, sampling=sampling)
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=req.prompt_ids), sampling=sampling)


async def _send(stub: pb_grpc.PDServeStub, index: int, req: BenchRequest, warmup: bool,
                t0: float) -> RequestRecord:
    start = time.perf_counter()
    first = last = None
    n, max_itl, status, prompt_tokens = 0, None, NO_FINAL, req.prompt_tokens
    call = stub.Generate(build_request(req))
    try:
        async for response in call:
            if response.HasField("delta") and response.delta.token_ids:
                now = time.perf_counter()
                if last is not None:
                    max_itl = max(max_itl or 0.0, now - last)
                first = first if first is not None else now
                last, n = now, n + len(response.delta.token_ids)
            elif response.HasField("final"):
                prompt_tokens = response.final.usage.prompt_tokens
                status = "OK"
    except grpc.aio.AioRpcError as e:
        status = e.code().name
    except asyncio.CancelledError:  # the run's hard stop: keep what was measured so far
        status = CANCELLED_AT_STOP
    finally:
        call.cancel()  # a no-op once the stream finished; otherwise the router aborts the request
    end = time.perf_counter()
    return RequestRecord(
        index=index, warmup=warmup, sent_at=start - t0, status=status, prompt_tokens=prompt_tokens,
        output_tokens=n, ttft=None if first is None else first - start,
        tpot=(last - first) / (n - 1) if first is not None and n > 1 else None, e2e=end - start,
        max_itl=max_itl)


async def run_load(address: str, offsets: Sequence[float], requests: Sequence[BenchRequest],
                   limits: RunLimits) -> RunResult:
    """Sends requests[i] at offsets[i] s whatever is still in flight (open loop); at max_seconds stops sending
    and cancels every stream still open. Refuses non-loopback addresses before connecting."""
    check_loopback(address)
    if len(offsets) != len(requests):
        raise ValueError(f"{len(offsets)} offsets for {len(requests)} requests")
    bar = tqdm(total=len(requests), unit="req", disable=not limits.progress, leave=False)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.PDServeStub(channel)
        tasks: list[asyncio.Task[RequestRecord]] = []
        t0 = time.perf_counter()

        async def launch_all() -> None:
            for i, (offset, req) in enumerate(zip(offsets, requests, strict=True)):
                delay = t0 + offset - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(_send(stub, i, req, i < limits.warmup, t0))
                task.add_done_callback(lambda _: bar.update())
                tasks.append(task)
            if tasks:
                await asyncio.wait(tasks)

        launcher = asyncio.create_task(launch_all())
        done, _ = await asyncio.wait([launcher], timeout=limits.max_seconds)
        if done:
            launcher.result()  # raises what went wrong in it, if anything did
        else:
            launcher.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(launcher, *tasks, return_exceptions=True)
        wall = time.perf_counter() - t0
    bar.close()
    # A task cancelled before it first ran never sent its request: it counts as not sent.
    records = tuple(t.result() for t in tasks if not t.cancelled())
    return RunResult(records=records, not_sent=len(requests) - len(records), wall_seconds=wall)
