"""The real cluster with a TP=2 prefill worker (rank 0 in its Ray actor, rank 1 a follower process) and a
TP=1 decode worker: ranks in GetServerInfo, greedy output equal to TP=1 colocated, followers gone when their
worker is killed (and back when Ray restarts it), nothing left after Ctrl-C (conftest checks the session)."""
from __future__ import annotations

import os
import signal
import time

import grpc
import pytest

from contracts.sampling import SamplingParams
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from proto.api import pb, pb_grpc

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

PROMPTS = [[1, 504, 3458, 282, 4649, 314], [1, 1096, 253, 1345, 43, 355, 260, 1071, 5288, 28, 260, 15, 89]]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def stub(start_cluster, tmp_path_factory):
    with start_cluster(tmp_path_factory.mktemp("tp-cluster"), "--prefill-tp", "2", "--decode-tp", "1") as c:
        with grpc.insecure_channel(c.address) as channel:
            yield pb_grpc.PDServeStub(channel)


def _workers(stub) -> dict[str, pb.WorkerStatus]:
    return {w.role: w for w in stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).workers}


def _generate(stub, prompt: list[int]) -> list[int]:
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt),
                                 sampling=pb.SamplingOptions(max_tokens=MAX_TOKENS, ignore_eos=True))
    return [t for r in stub.Generate(request, timeout=180) if r.HasField("delta") for t in r.delta.token_ids]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_tp2_prefill_tp1_decode_ranks_parity_and_follower_lifetime(stub):
    workers = _workers(stub)
    prefill, decode = workers["prefill"], workers["decode"]
    assert (prefill.tp_size, decode.tp_size) == (2, 1)
    # SmolLM2's 3 kv heads split 2 + 1 over the prefill ranks; the decode worker holds all three.
    assert [list(r.kv_heads) for r in prefill.tp_ranks] == [[0, 1], [2]]
    assert [list(r.kv_heads) for r in decode.tp_ranks] == [[0, 1, 2]]

    expected = LLMEngine(EngineConfig(device="cpu", num_kv_blocks=64)).generate(
        PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    assert [_generate(stub, p) for p in PROMPTS] == expected

    leader, follower = prefill.tp_ranks[0].pid, prefill.tp_ranks[1].pid
    os.kill(leader, signal.SIGKILL)  # the worker dies without a word: its follower must not stay behind
    deadline = time.monotonic() + 15
    while _alive(follower) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(follower), "the killed worker's follower rank is still running"

    deadline = time.monotonic() + 300  # Ray restarts the worker: two fresh ranks, serving again
    while time.monotonic() < deadline:
        now = _workers(stub)["prefill"]
        if now.state == "ready" and now.tp_ranks and now.tp_ranks[0].pid != leader:
            break
        time.sleep(1)
    assert now.state == "ready" and now.tp_size == 2 and now.tp_ranks[1].pid != follower
    assert _generate(stub, PROMPTS[0]) == expected[0]
