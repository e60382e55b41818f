"""Drives the real cluster as a client: streaming, concurrency, parity, abort, bad input, health, metrics."""
from __future__ import annotations

import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from contracts.sampling import SamplingParams
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.spec.config import SpecConfig
from proto.api import pb, pb_grpc

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

PARITY_PROMPTS = [
    [1, 504, 3458, 282, 4649, 314],  # plain token ids: the parity check must not depend on the tokenizer
    [1, 17, 28, 339, 1142, 42, 2071, 30, 9641],
    [1, 1096, 253, 1345, 43, 355, 260, 1071, 5288, 28, 260, 15, 89, 3589, 2115, 30, 356, 282],
]


@pytest.fixture(scope="module")
def stub(cluster):
    with grpc.insecure_channel(cluster.address) as channel:
        yield pb_grpc.PDServeStub(channel)


def run_generate(stub, request: pb.GenerateRequest,
                 timeout: float = 120.0) -> tuple[list[int], str, pb.FinalResult]:
    ids, text, final = [], "", None
    for response in stub.Generate(request, timeout=timeout):
        if response.HasField("delta"):
            ids += list(response.delta.token_ids)
            text += response.delta.text
        else:
            final = response.final
    assert final is not None, "stream ended without a final message"
    return ids, text, final


def free_blocks(stub) -> dict[str, int]:
    info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    return {w.worker_id: w.free_kv_blocks for w in info.workers}


def idle_free_blocks(stub) -> dict[str, int]:
    """Free-block counts once earlier tests' requests are gone (router refreshes worker load every ~1 s)."""
    info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    total = {w.worker_id: w.total_kv_blocks for w in info.workers}
    current = wait_free_blocks(stub, total)
    assert current == total, f"cluster not idle before the test: {current} free of {total}"
    return current


def wait_free_blocks(stub, expected: dict[str, int], timeout: float = 30.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    current = free_blocks(stub)
    while current != expected and time.monotonic() < deadline:
        time.sleep(0.2)
        current = free_blocks(stub)
    return current


def test_generate_streams_tokens_then_a_final_message(stub):
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="Say hello.")])
    request = pb.GenerateRequest(chat=chat, sampling=pb.SamplingOptions(max_tokens=12))
    deltas = [r for r in stub.Generate(request, timeout=120)]
    assert deltas[-1].HasField("final")
    token_deltas = [r for r in deltas if r.HasField("delta")]
    assert len(token_deltas) >= 2, "tokens must arrive as several deltas, not one block"
    final = deltas[-1].final
    assert final.usage.completion_tokens == sum(len(r.delta.token_ids) for r in token_deltas)
    assert final.usage.prompt_tokens > 0
    assert 0 < final.timings.ttft_seconds <= final.timings.e2e_seconds
    assert final.timings.prefill_worker and final.timings.decode_worker
    assert all(r.request_id == deltas[0].request_id for r in deltas)


def test_disaggregated_greedy_equals_single_process_engine(stub):
    # The cluster speculates (conftest starts it with --spec ngram); the reference engine does not.
    engine = LLMEngine(EngineConfig(device="cpu", num_kv_blocks=64, spec=SpecConfig("off")))
    expected = engine.generate(PARITY_PROMPTS, SamplingParams(max_tokens=24, ignore_eos=True))
    drafted = accepted = 0
    for prompt, want in zip(PARITY_PROMPTS, expected, strict=True):
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt),
                                     sampling=pb.SamplingOptions(max_tokens=24, ignore_eos=True))
        got, _, final = run_generate(stub, request)
        assert got == want
        assert final.finish_reason == pb.FINISH_REASON_LENGTH
        drafted += final.usage.draft_tokens
        accepted += final.usage.accepted_draft_tokens
    assert drafted > 0 and 0 <= accepted <= drafted


def test_eight_concurrent_clients_all_complete(stub):
    results: dict[int, object] = {}

    def client(i: int) -> None:
        request = pb.GenerateRequest(text=f"Count from {i} to {i + 5}:",
                                     sampling=pb.SamplingOptions(max_tokens=8, ignore_eos=True))
        try:
            results[i] = run_generate(stub, request)
        except grpc.RpcError as e:
            results[i] = e

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(results) == list(range(8))
    for i, result in results.items():
        assert not isinstance(result, grpc.RpcError), f"client {i}: {result}"
        ids, _, final = result
        assert len(ids) == 8 and final.usage.completion_tokens == 8


def test_abort_mid_stream_returns_every_worker_free_block_count(stub):
    before = idle_free_blocks(stub)
    request = pb.GenerateRequest(request_id="abort-me", text="Write a long story about a robot.",
                                 sampling=pb.SamplingOptions(max_tokens=400, ignore_eos=True))
    stream = stub.Generate(request, timeout=120)
    first = next(stream)
    assert first.HasField("delta")
    assert stub.Abort(pb.AbortRequest(request_id="abort-me"), timeout=10).found
    rest = list(stream)
    assert rest and rest[-1].final.finish_reason == pb.FINISH_REASON_ABORT
    assert wait_free_blocks(stub, before) == before


def test_client_disconnect_returns_every_worker_free_block_count(stub):
    before = idle_free_blocks(stub)
    request = pb.GenerateRequest(text="Tell me everything about oceans.",
                                 sampling=pb.SamplingOptions(max_tokens=400, ignore_eos=True))
    stream = stub.Generate(request, timeout=120)
    next(stream)
    stream.cancel()  # the client goes away mid-stream
    assert wait_free_blocks(stub, before) == before


@pytest.mark.parametrize("request_kwargs, field", [
    (dict(text=""), "text"),
    (dict(), "input"),
    (dict(text="hi", sampling=pb.SamplingOptions(max_tokens=0)), "max_tokens"),
    (dict(text="hi", sampling=pb.SamplingOptions(max_tokens=10_000_000)), "max_tokens"),
    (dict(text="hi", sampling=pb.SamplingOptions(temperature=-1)), "temperature"),
    (dict(text="hi", sampling=pb.SamplingOptions(top_p=0)), "top_p"),
    (dict(text="hi", sampling=pb.SamplingOptions(top_p=1.5)), "top_p"),
    (dict(text="hi", sampling=pb.SamplingOptions(top_k=-2)), "top_k"),
    (dict(token_ids=pb.TokenIds(ids=[1, 999_999])), "token_ids"),
    (dict(token_ids=pb.TokenIds(ids=[])), "token_ids"),
    (dict(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="robot", content="hi")])), "role"),
    (dict(chat=pb.ChatMessages()), "chat"),
    (dict(text="hi", sampling=pb.SamplingOptions(stop=[""])), "stop"),
    (dict(text="hi", sampling=pb.SamplingOptions(stop_token_ids=[-1])), "stop_token_ids"),
])
def test_bad_input_is_invalid_argument_naming_the_field(stub, request_kwargs, field):
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(pb.GenerateRequest(**request_kwargs), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()


def test_deadline_exceeded_frees_blocks(stub):
    before = idle_free_blocks(stub)
    request = pb.GenerateRequest(text="Write a very long essay.",
                                 sampling=pb.SamplingOptions(max_tokens=1000, ignore_eos=True))
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(request, timeout=1.5))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_free_blocks(stub, before) == before


def test_health_serving_and_reflection_lists_services(cluster):
    with grpc.insecure_channel(cluster.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        list_request = reflection_pb2.ServerReflectionRequest(list_services="")
        responses = reflection.ServerReflectionInfo(iter([list_request]), timeout=5)
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"pdserve.v1.PDServe", "grpc.health.v1.Health"} <= names


def test_model_and_server_info(stub):
    model = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
    assert model.vocab_size == 49152 and model.context_length > 0 and model.kv_cache_dtype
    assert model.speculative == "ngram k=5 adaptive"
    server = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=5)
    roles = sorted(w.role for w in server.workers)
    assert roles == ["decode", "prefill"] and all(w.state == "ready" for w in server.workers)


def test_metrics_endpoint_covers_router_and_workers(cluster, stub):
    run_generate(stub, pb.GenerateRequest(text="Hello", sampling=pb.SamplingOptions(max_tokens=4)))
    body = urllib.request.urlopen(cluster.metrics_url, timeout=10).read().decode()
    for name in ("pdserve_time_to_first_token_seconds", "pdserve_requests_total",
                 "pdserve_generation_tokens_total", "pdserve_kv_transfer_bytes_total",
                 "pdserve_kv_cache_usage_ratio", "pdserve_spec_draft_tokens_total",
                 "pdserve_spec_accepted_tokens_total", "pdserve_spec_acceptance_ratio_bucket"):
        assert name in body, name
