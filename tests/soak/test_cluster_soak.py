"""Soak: mixed requests near capacity, 30% cancelled, a decode and a prefill worker kill -9ed mid-run; then
blocks, deadlines, statuses, greedy identity and the router's RSS are checked and printed."""
from __future__ import annotations

import collections
import contextlib
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import grpc
import pytest
from soak_load import GREEDY_TOKENS, Outcome, Plan, RssSampler, mixed_plans, run_one

from proto.api import pb, pb_grpc
from tests.e2e.conftest import actor_pid, metric, running_cluster

pytestmark = [pytest.mark.e2e, pytest.mark.soak, pytest.mark.timeout(3600)]

SEED = 15
CANCEL_SHARE = 0.30
RATE_OF_CAPACITY = 0.9
GREEDY_EVERY = 20  # one request in 20 is a fixed greedy prompt whose output is checked token by token
TIMEOUT_S = 120.0  # each request's deadline (the client's gRPC timeout)
DEADLINE_SLACK_S = 2.0  # a stream "outlived its deadline" when it ended later than this after it
PROBE_S = 20.0
PROBE_CONCURRENCY = 16
MAX_CLIENTS = 128  # client threads; arrivals beyond them wait (reported as lag)
SETTLE_S = 180.0  # after the run: restarted workers ready and every block back
KV_BLOCKS = 256
GREEDY_PROMPTS = [(1, 504, 3458, 282, 4649, 314), (1, 9690, 28, 2185, 314, 260, 1978, 282),
                  tuple(range(200, 260)), (1, 1206, 1122, 325, 1345, 30, 3108, 6129, 1500, 8237, 30)]
CLEAR_CODES = {grpc.StatusCode.OK, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE,
               grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED}
MIB = 1024 * 1024


def workers(stub: pb_grpc.PDServeStub) -> dict[str, pb.WorkerStatus]:
    return {w.worker_id: w for w in stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=5).workers}


def measure_capacity(stub: pb_grpc.PDServeStub) -> float:
    """Completed requests per second of the same mix, closed loop, PROBE_CONCURRENCY at a time."""
    plans = iter(mixed_plans(100_000, SEED + 1, GREEDY_PROMPTS, 0.0, GREEDY_EVERY))
    done, lock, end = [0], threading.Lock(), time.monotonic() + PROBE_S

    def client() -> None:
        while time.monotonic() < end:
            with lock:
                plan = next(plans)
            if run_one(stub, plan, TIMEOUT_S).code == grpc.StatusCode.OK:
                with lock:
                    done[0] += 1

    start = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(PROBE_CONCURRENCY)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done[0] / (time.monotonic() - start)


def run_open_loop(stub: pb_grpc.PDServeStub, plans: list[Plan], rate: float,
                  kills: dict[int, Callable[[], None]]) -> tuple[list[Outcome], float]:
    """Poisson arrivals at `rate`; kills[i]() runs just before request i is sent. Returns the outcomes and
    the largest lag of a send behind its scheduled time."""
    rng = random.Random(SEED + 2)
    futures: list[Future[Outcome]] = []
    lag = 0.0
    with ThreadPoolExecutor(MAX_CLIENTS) as pool:
        due = time.monotonic()
        for plan in plans:
            due += rng.expovariate(rate)
            time.sleep(max(0.0, due - time.monotonic()))
            lag = max(lag, time.monotonic() - due)
            if plan.index in kills:
                kills[plan.index]()
            futures.append(pool.submit(run_one, stub, plan, TIMEOUT_S))
        return [f.result() for f in futures], lag


def settled(stub: pb_grpc.PDServeStub, start: dict[str, int]) -> dict[str, pb.WorkerStatus]:
    """Waits until every worker of the start is ready again with its start's free blocks."""
    deadline, now = time.monotonic() + SETTLE_S, {}
    while time.monotonic() < deadline:
        with contextlib.suppress(grpc.RpcError):
            now = workers(stub)
            if all(wid in now and now[wid].state == "ready" and now[wid].free_kv_blocks == free
                   for wid, free in start.items()):
                return now
        time.sleep(0.5)
    return now


def test_soak_mixed_load_with_cancels_and_kills(tmp_path_factory: pytest.TempPathFactory,
                                                soak_requests: int) -> None:
    with running_cluster(tmp_path_factory.mktemp("soak"), "--http-port", "0", "--kv-blocks", str(KV_BLOCKS),
                         "--migration-limit", "2") as cluster, \
            grpc.insecure_channel(cluster.address) as channel:
        stub = pb_grpc.PDServeStub(channel)
        references = [run_one(stub, Plan(-1, p, GREEDY_TOKENS, None), TIMEOUT_S) for p in GREEDY_PROMPTS]
        assert all(r.code == grpc.StatusCode.OK and len(r.token_ids) == GREEDY_TOKENS for r in references)
        witness_ref = run_one(stub, Plan(-1, GREEDY_PROMPTS[0], 4 * GREEDY_TOKENS, None), TIMEOUT_S).token_ids
        capacity = measure_capacity(stub)
        # The start: every block free once the probe's last requests are gone (the stats lag a step).
        start_blocks = {wid: w.total_kv_blocks for wid, w in workers(stub).items()}
        now = settled(stub, start_blocks)
        assert all(now[wid].free_kv_blocks == free for wid, free in start_blocks.items()), \
            f"blocks still taken after the capacity probe: {now}"
        rate = RATE_OF_CAPACITY * capacity
        plans = mixed_plans(soak_requests, SEED, GREEDY_PROMPTS, CANCEL_SHARE, GREEDY_EVERY)
        killed: dict[str, float] = {}
        witnesses: list[Outcome] = []  # the greedy streams each kill hits
        threads: list[threading.Thread] = []

        def kill(actor_class: str) -> Callable[[], None]:
            """Sends a greedy request and kills the worker once it streamed 4 tokens: a decode kill then
            migrates at least one greedy request (checked against its undisturbed output)."""
            def go() -> None:
                pid = actor_pid(cluster, actor_class)

                def trigger(n: int) -> None:
                    if n >= 4 and actor_class not in killed:
                        os.kill(pid, signal.SIGKILL)
                        killed[actor_class] = time.monotonic()

                plan = Plan(-2, GREEDY_PROMPTS[0], 4 * GREEDY_TOKENS, None, 0)
                thread = threading.Thread(target=lambda: witnesses.append(run_one(stub, plan, TIMEOUT_S,
                                                                                  trigger)))
                thread.start()
                threads.append(thread)
            return go

        kills = {soak_requests // 3: kill("DecodeWorkerActor"),
                 2 * soak_requests // 3: kill("PrefillWorkerActor")}
        began = time.monotonic()
        with RssSampler(cluster.process.pid) as rss:
            outcomes, lag = run_open_loop(stub, plans, rate, kills)
            for thread in threads:
                thread.join()
            after = settled(stub, start_blocks)
        wall = time.monotonic() - began
        migrations = metric(cluster, "pdserve_request_migrations_total")
        restarts = metric(cluster, "pdserve_worker_restarts_total")

    codes = collections.Counter(o.code.name for o in outcomes)
    reasons = collections.Counter(f"{o.code.name}: {o.details[:70]}" for o in outcomes
                                  if o.code not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED))
    cancelled_planned = sum(o.plan.cancel_after is not None for o in outcomes)
    greedy = [o for o in outcomes if o.plan.greedy_ref is not None]
    greedy_ok = [o for o in greedy if o.code == grpc.StatusCode.OK]
    wrong = [o.plan.index for o in greedy_ok if o.token_ids != references[o.plan.greedy_ref].token_ids]
    decode_kill = killed.get("DecodeWorkerActor", float("inf"))
    greedy_across_kill = sum(o.started < decode_kill < o.ended for o in greedy_ok)
    overdue = [o.plan.index for o in outcomes if o.ended - o.started > TIMEOUT_S + DEADLINE_SLACK_S]
    unclear = [(o.plan.index, o.code.name, o.details) for o in outcomes
               if o.code not in CLEAR_CODES or (o.code != grpc.StatusCode.OK and not o.details)]
    longest = max(o.ended - o.started for o in outcomes)
    start_rss, peak_rss, end_rss = rss.samples[0], max(rss.samples), rss.samples[-1]
    print(f"\nsoak: {soak_requests} requests, capacity probe {capacity:.2f} req/s -> offered "
          f"{rate:.2f} req/s "
          f"(largest send lag {lag:.1f} s), wall {wall:.0f} s")
    print(f"  planned client cancels: {cancelled_planned} ({cancelled_planned / soak_requests:.0%})")
    print(f"  statuses: {dict(sorted(codes.items()))}")
    for reason, count in reasons.most_common():
        print(f"    {count:5d}  {reason}")
    print(f"  kill -9: decode at request {soak_requests // 3}, prefill at {2 * soak_requests // 3}; "
          f"worker restarts {restarts:.0f}, migrations {migrations:.0f}")
    print(f"  greedy: {len(greedy_ok)}/{len(greedy)} OK, {greedy_across_kill} in flight across the decode "
          f"kill, {len(wrong)} differ from the undisturbed run")
    hit = [(w.code.name, "identical" if w.token_ids == witness_ref else "DIFFERS", w.decode_worker)
           for w in witnesses]
    print(f"  greedy streams the kills hit mid-stream (decode, prefill kill): {hit}")
    print(f"  longest stream {longest:.1f} s (deadline {TIMEOUT_S:.0f} s), overdue {len(overdue)}")
    print("  free KV blocks start -> end: " + ", ".join(
        f"{wid} {free} -> {after[wid].free_kv_blocks if wid in after else '?'}"
        for wid, free in sorted(start_blocks.items())))
    print(f"  router RSS start {start_rss / MIB:.0f} MiB, peak {peak_rss / MIB:.0f} MiB, "
          f"end {end_rss / MIB:.0f} MiB ({len(rss.samples)} samples)")

    assert set(killed) == {"DecodeWorkerActor", "PrefillWorkerActor"}
    assert all(wid in after and after[wid].free_kv_blocks == free for wid, free in start_blocks.items()), \
        "free KV blocks did not come back to their start"
    assert not overdue, f"streams outlived their deadline: {overdue[:20]}"
    assert not unclear, f"requests without a clear status: {unclear[:20]}"
    assert not wrong, f"greedy outputs differ from the undisturbed run: {wrong}"
    assert len(witnesses) == 2 and all(w.code == grpc.StatusCode.OK and w.token_ids == witness_ref
                                       for w in witnesses), "a greedy stream hit by a kill did not survive it"
    assert codes["OK"] > 0 and greedy_ok
    assert end_rss - start_rss <= max(64 * MIB, start_rss // 4), "the router's RSS grew"
