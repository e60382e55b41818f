"""The live cluster through its OpenAI-compatible HTTP door, driven by the official `openai` client."""
from __future__ import annotations

import urllib.request

import grpc
import httpx
import openai
import pytest
from test_cluster import idle_free_blocks, run_generate, wait_free_blocks

from proto.api import pb, pb_grpc

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

MODEL = "SmolLM2-135M-Instruct"  # derived from the embedded SmolLM2-135M-Instruct.Q4_1.gguf
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
LONG = {"ignore_eos": True}  # vLLM's extension: run to max_tokens whatever the model says


@pytest.fixture(scope="module")
def oai(cluster):
    with openai.OpenAI(base_url=cluster.http_url, api_key="x", timeout=120, max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def stub(cluster):
    with grpc.insecure_channel(cluster.address) as channel:
        yield pb_grpc.PDServeStub(channel)


def test_models_lists_the_served_model_and_pdserve_up_printed_the_url(oai, cluster):
    assert [m.id for m in oai.models.list().data] == [MODEL]
    assert f"OpenAI-compatible API on {cluster.http_url}" in cluster.log_path.read_text()


def test_chat_streamed_equals_chat_whole_and_the_grpc_chat(oai, stub):
    whole = oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12)
    text = whole.choices[0].message.content
    assert text and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens <= 12 and whole.usage.prompt_tokens > 0
    chunks = list(oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, stream=True,
                                              stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2, "one chunk per token"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=CHAT[0]["content"])])
    request = pb.GenerateRequest(chat=chat, sampling=pb.SamplingOptions(max_tokens=12))
    _, grpc_text, _ = run_generate(stub, request)
    assert grpc_text == text  # greedy: both doors give the same answer


def test_completion_greedy_equals_the_grpc_path(oai, stub):
    prompt = "The three primary colors are"
    got = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=16, extra_body=LONG)
    ids, text, final = run_generate(stub, pb.GenerateRequest(
        text=prompt, sampling=pb.SamplingOptions(max_tokens=16, ignore_eos=True)))
    assert got.choices[0].text == text and got.choices[0].finish_reason == "length"
    assert got.usage.completion_tokens == len(ids) == 16
    assert got.usage.prompt_tokens == final.usage.prompt_tokens
    streamed = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=16, stream=True, extra_body=LONG)
    assert "".join(c.choices[0].text for c in streamed) == text


def test_stop_string_cuts_the_text_before_it(oai):
    prompt = "List the days of the week: Monday,"
    full = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=16, extra_body=LONG).choices[0].text
    stop = full.split()[2] if len(full.split()) > 2 else full.strip()[-2:]
    cut = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=16, stop=[stop], extra_body=LONG)
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == full[:full.find(stop)]


def test_seed_reproduces_a_sampled_answer(oai):
    def sample(seed: int) -> str:
        r = oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=1.0, seed=seed,
                                        extra_body=LONG)
        return r.choices[0].message.content

    assert sample(1234) == sample(1234)


def test_bad_input_is_a_400_naming_the_field(oai):
    cases = [({"temperature": -1}, "temperature"), ({"n": 2}, "n"), ({"top_p": 1.5}, "top_p"),
             ({"max_tokens": 10_000_000}, "max_tokens"), ({"logprobs": True}, "logprobs")]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as err:
            oai.chat.completions.create(model=MODEL, messages=CHAT, **kwargs)
        assert err.value.status_code == 400
        assert err.value.param == param and err.value.body["message"].startswith(f"{param}: ")
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="gpt-4o", messages=CHAT)


def test_malformed_json_is_a_400_with_openais_error_body(cluster):
    r = httpx.post(f"{cluster.http_url}/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_disconnect_mid_stream_returns_every_worker_free_block_count(oai, stub):
    before = idle_free_blocks(stub)
    stream = oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=400, stream=True,
                                         extra_body=LONG)
    chunks = iter(stream)
    next(chunks), next(chunks)  # the role chunk, then the first token
    stream.close()  # the client goes away mid-stream
    assert wait_free_blocks(stub, before) == before


def test_metrics_count_each_door_under_its_own_api_label(oai, stub, cluster):
    oai.completions.create(model=MODEL, prompt="Hello", max_tokens=2)
    run_generate(stub, pb.GenerateRequest(text="Hello", sampling=pb.SamplingOptions(max_tokens=2)))
    body = urllib.request.urlopen(cluster.metrics_url, timeout=10).read().decode()
    counted = [line for line in body.splitlines() if line.startswith("pdserve_requests_total{")]
    for api in ("http", "grpc"):
        assert any(f'api="{api}"' in line for line in counted), api
