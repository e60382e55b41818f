"""The HTTP door with fake workers: OpenAI response bodies, SSE framing byte for byte, the official client."""

from __future__ import annotations

import json

import openai
import pytest
from fakes import FAKE_MODEL, FakeTokenizer, fake_cluster, output_token, run, serve_http

pytestmark = pytest.mark.timeout(60)

MODEL = FAKE_MODEL.model_name
USER_HI = [{"role": "user", "content": "hi"}]
PROMPT_HI = len(FakeTokenizer().apply_chat_template(USER_HI))  # "<user>hi\n<assistant>": 20 tokens


def test_chat_completion_runs_the_chat_template_and_answers_openais_body() -> None:
    async def body() -> None:
        prefill, decode = fake_cluster()
        async with serve_http(prefill, decode) as (h, client):
            r = await client.post(
                "/v1/chat/completions", json={"model": MODEL, "messages": USER_HI, "max_tokens": 4}
            )
            assert r.status_code == 200, r.text
            assert not h.server.active
        got = r.json()
        assert got["id"].startswith("chatcmpl-") and got["object"] == "chat.completion"
        assert got["model"] == MODEL and isinstance(got["created"], int)
        assert got["choices"] == [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "abcd"},
                "logprobs": None,
                "finish_reason": "length",
            }
        ]
        n = PROMPT_HI
        assert got["usage"] == {"prompt_tokens": n, "completion_tokens": 4, "total_tokens": n + 4}
        (reserve,) = decode[0].reserve_calls
        assert reserve.prompt_token_ids == tuple(FakeTokenizer().apply_chat_template(USER_HI))
        assert got["id"] == f"chatcmpl-{reserve.request_id}"  # one id from door to workers
        assert not decode[0].abort_calls and len(decode[0].free_blocks) == decode[0].num_total_blocks

    run(body())


def test_openai_fields_map_onto_the_same_sampling_params_as_grpc() -> None:
    async def body() -> None:
        prefill, decode = fake_cluster()
        async with serve_http(prefill, decode) as (_, client):
            fields = {"temperature": 0.5, "top_p": 0.9, "top_k": 40, "seed": 7, "stop": ["\n", "END"]}
            # Fields the door does not know are ignored, as OpenAI does.
            unknown = {"frequency_penalty": 0.0, "user": "someone", "metadata": {"a": 1}}
            r1 = await client.post(
                "/v1/chat/completions",
                json={"model": MODEL, "messages": USER_HI, "max_completion_tokens": 3, **fields, **unknown},
            )
            r2 = await client.post(
                "/v1/completions", json={"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 2, "stop": "x"}
            )
            assert (r1.status_code, r2.status_code) == (200, 200), (r1.text, r2.text)
        s1, s2 = (c.sampling for c in decode[0].reserve_calls)
        assert (s1.max_tokens, s1.temperature, s1.top_p, s1.top_k, s1.seed, s1.stop) == (
            3,
            0.5,
            0.9,
            40,
            7,
            ("\n", "END"),
        )
        assert decode[0].reserve_calls[1].prompt_token_ids == (5, 6, 7)
        assert (s2.max_tokens, s2.temperature, s2.stop) == (2, 0.0, ("x",))
        got = r2.json()
        assert got["object"] == "text_completion" and got["id"].startswith("cmpl-")
        assert got["choices"] == [{"index": 0, "text": "ab", "logprobs": None, "finish_reason": "length"}]

    run(body())


def test_stop_token_ids_extension_finishes_with_stop() -> None:
    async def body() -> dict:
        prefill, decode = fake_cluster()
        async with serve_http(prefill, decode) as (_, client):
            r = await client.post(
                "/v1/completions",
                json={"model": MODEL, "prompt": "hi", "max_tokens": 9, "stop_token_ids": [output_token(2)]},
            )
            assert r.status_code == 200, r.text
        return r.json()

    got = run(body())
    assert got["choices"][0]["text"] == "abc" and got["choices"][0]["finish_reason"] == "stop"
    assert got["usage"]["completion_tokens"] == 3


def test_models_lists_the_served_model_and_retrieve_knows_it() -> None:
    async def body() -> None:
        prefill, decode = fake_cluster()
        async with serve_http(prefill, decode, served_model_name="byte-model") as (_, client):
            listed = (await client.get("/v1/models")).json()
            one = await client.get("/v1/models/byte-model")
            shouted = await client.get("/v1/models/BYTE-Model")  # ids match without regard to case
            completion = await client.post("/v1/completions",
                                           json={"model": "Byte-Model", "prompt": "ab", "max_tokens": 2})
            other = await client.get("/v1/models/gpt-4")
        assert listed["object"] == "list" and [m["id"] for m in listed["data"]] == ["byte-model"]
        card = listed["data"][0]
        assert card["object"] == "model" and card["max_model_len"] == FAKE_MODEL.context_length
        assert one.json()["id"] == "byte-model" and shouted.json()["id"] == "byte-model"
        assert completion.status_code == 200 and completion.json()["choices"][0]["finish_reason"]
        assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found"

    run(body())


def event(payload: str) -> str:
    return f"data: {payload}\n\n"


def test_chat_stream_is_openais_sse_framing_byte_for_byte() -> None:
    async def body() -> tuple[str, str]:
        prefill, decode = fake_cluster()
        async with serve_http(prefill, decode) as (_, client):
            r = await client.post(
                "/v1/chat/completions",
                json={
                    "model": MODEL,
                    "messages": USER_HI,
                    "max_tokens": 3,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                },
            )
        return r.headers["content-type"], r.text

    content_type, text = run(body())
    assert content_type.startswith("text/event-stream")
    first = json.loads(text.split("\n", 1)[0].removeprefix("data: "))
    kind = "chat.completion.chunk"
    head = f'"id":"{first["id"]}","object":"{kind}","created":{first["created"]},"model":"{MODEL}"'

    def chunk(delta: str, finish: str = "null") -> str:
        choice = f'{{"index":0,"delta":{delta},"logprobs":null,"finish_reason":{finish}}}'
        return event(f'{{{head},"choices":[{choice}],"usage":null}}')

    usage = f'{{"prompt_tokens":{PROMPT_HI},"completion_tokens":3,"total_tokens":{PROMPT_HI + 3}}}'
    assert text == (
        chunk('{"role":"assistant","content":""}')
        + chunk('{"content":"a"}')
        + chunk('{"content":"b"}')
        + chunk('{"content":"c"}')
        + chunk("{}", '"length"')
        + event(f'{{{head},"choices":[],"usage":{usage}}}')
        + "data: [DONE]\n\n"
    )


def test_completion_stream_without_usage_ends_with_finish_chunk_then_done() -> None:
    async def body() -> str:
        prefill, decode = fake_cluster()
        async with serve_http(prefill, decode) as (_, client):
            r = await client.post(
                "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2, "stream": True}
            )
        return r.text

    text = run(body())
    first = json.loads(text.split("\n", 1)[0].removeprefix("data: "))
    head = f'"id":"{first["id"]}","object":"text_completion","created":{first["created"]},"model":"{MODEL}"'

    def chunk(t: str, finish: str = "null") -> str:
        choice = f'{{"index":0,"text":"{t}","logprobs":null,"finish_reason":{finish}}}'
        return event(f'{{{head},"choices":[{choice}]}}')

    assert text == chunk("a") + chunk("b") + chunk("", '"length"') + "data: [DONE]\n\n"


def test_official_openai_client_streams_and_completes_through_the_door() -> None:
    async def body() -> None:
        prefill, decode = fake_cluster()
        async with serve_http(prefill, decode) as (h, _):
            client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{h.server.http_port}/v1", api_key="x")
            chat = await client.chat.completions.create(model=MODEL, messages=USER_HI, max_tokens=3)
            assert chat.choices[0].message.content == "abc" and chat.choices[0].finish_reason == "length"
            assert chat.usage is not None and chat.usage.completion_tokens == 3
            stream = await client.completions.create(
                model=MODEL, prompt="hi", max_tokens=4, stream=True, stream_options={"include_usage": True}
            )
            chunks = [c async for c in stream]
            assert "".join(c.choices[0].text for c in chunks if c.choices) == "abcd"
            assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 2 + 4
            await client.close()

    run(body(), timeout_s=20)


def test_http_port_flag_is_on_at_8000_by_default_off_at_0_and_auto_picks_a_free_port() -> None:
    from deploy.cli import build_parser

    def http_port(*argv: str) -> int | None:
        return build_parser().parse_args(["up", *argv]).http_port

    assert (http_port(), http_port("--http-port", "0"), http_port("--http-port", "auto")) == (8000, None, 0)
    assert http_port("--http-port", "8080") == 8080


def test_served_model_name_is_the_model_file_name_as_spelled_without_its_quant_tag(tmp_path) -> None:
    from deploy.launcher import served_model_name

    for file, want in [
        ("SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
        ("Llama-3-8B-q8_0.gguf", "Llama-3-8B"),
        ("tiny.gguf", "tiny"),
    ]:
        (tmp_path / file).write_bytes(b"")
        assert served_model_name(tmp_path / file) == want
    (tmp_path / "Qwen2-0.5B").mkdir()
    assert served_model_name(tmp_path / "Qwen2-0.5B") == "Qwen2-0.5B"
