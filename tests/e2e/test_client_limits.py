"""The live cluster's limits as clients meet them: the context window it reports is the one it can serve."""
from __future__ import annotations

import json
import urllib.request

import grpc
import pytest

from proto.api import pb, pb_grpc

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

BLOCK_SIZE = 16  # EngineConfig.block_size under `pdserve up`


@pytest.fixture(scope="module")
def stub(cluster):
    with grpc.insecure_channel(cluster.address) as channel:
        yield pb_grpc.PDServeStub(channel)


@pytest.fixture(scope="module")
def kv_tokens(stub) -> int:
    """One decode worker's KV cache in tokens: 4096 under the e2e cluster's --kv-blocks (the model: 8192)."""
    info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    return min(w.total_kv_blocks for w in info.workers if w.role == "decode") * BLOCK_SIZE


def test_the_reported_context_window_is_what_one_worker_kv_cache_holds(stub, cluster, kv_tokens):
    assert kv_tokens < 8192  # else this cluster does not test it
    assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).context_length == kv_tokens
    with urllib.request.urlopen(f"{cluster.http_url}/models", timeout=10) as r:
        assert json.load(r)["data"][0]["max_model_len"] == kv_tokens


@pytest.mark.parametrize(("past_the_end", "max_tokens", "field"), [
    (100, 4, "input"),  # within the model's window, beyond the KV cache: was UNAVAILABLE from the worker
    (-6, 50, "sampling.max_tokens"),  # the prompt fits, its output does not: was cut short as `length`
])
def test_a_request_beyond_the_kv_cache_is_invalid_argument_at_once(stub, kv_tokens, past_the_end, max_tokens,
                                                                    field):
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * (kv_tokens + past_the_end)),
                                 sampling=pb.SamplingOptions(max_tokens=max_tokens))
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(request, timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(f"{field}: ") and str(kv_tokens) in e.value.details()
