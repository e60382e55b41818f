"""The HTTP door against what OpenAI-style clients send: fields it cannot honour are refused by name, not
ignored; vLLM's and batching clients' spellings of supported things are understood."""

from __future__ import annotations

from typing import Any

import pytest
from fakes import FAKE_MODEL, FakeTokenizer, fake_cluster, run, serve_http

pytestmark = pytest.mark.timeout(60)

MODEL = FAKE_MODEL.model_name
CHAT: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
TEXT: dict[str, Any] = {"model": MODEL, "prompt": "hi", "max_tokens": 2}

REFUSED = [  # (path, body, the field the 400 names): each was a 200 that silently ignored the field
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 3}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {**TEXT, "stream": False, "stream_options": {}}, "stream_options"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/completions", {**TEXT, "suffix": " end"}, "suffix"),
    ("/v1/completions", {**TEXT, "best_of": 2}, "best_of"),
    ("/v1/completions", {**TEXT, "logit_bias": {"5": -100}}, "logit_bias"),
    ("/v1/chat/completions", {**CHAT, "frequency_penalty": 0.5}, "frequency_penalty"),
    ("/v1/completions", {**TEXT, "presence_penalty": -1}, "presence_penalty"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {**CHAT, "functions": [{"name": "f"}], "tool_choice": "auto"}, "functions"),
]
# The same fields at the values meaning "off" (what LangChain's OpenAI LLM sends on every call) are served.
OFF_VALUES = [
    ("/v1/completions", {**TEXT, "suffix": "", "best_of": 1, "logit_bias": {}, "frequency_penalty": 0,
                         "presence_penalty": 0.0}),
    ("/v1/chat/completions", {**CHAT, "logit_bias": None, "tools": [], "frequency_penalty": 0}),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"5": 0, "6": 0.0}}),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}],
                              "tool_choice": "none"}),
]


def test_a_field_the_door_cannot_honour_is_a_400_naming_it() -> None:
    async def body() -> list[tuple[int, dict]]:
        prefill, decode = fake_cluster()
        async with serve_http(prefill, decode) as (_, client):
            out = [await client.post(path, json=payload) for path, payload, _ in REFUSED]
        assert not decode[0].reserve_calls
        return [(r.status_code, r.json()) for r in out]

    for (status, got), (_, _, param) in zip(run(body()), REFUSED, strict=True):
        assert status == 400 and got["error"]["param"] == param, got
        assert got["error"]["message"].startswith(f"{param}: "), got


def test_text_response_format_logprobs_false_and_vllms_top_k_minus_one_are_accepted() -> None:
    async def body() -> None:
        prefill, decode = fake_cluster()
        async with serve_http(prefill, decode) as (_, client):
            extra = {"response_format": {"type": "text"}, "logprobs": False, "top_logprobs": 0, "top_k": -1}
            r = await client.post("/v1/chat/completions", json={**CHAT, **extra})
            assert r.status_code == 200, r.text
        (reserve,) = decode[0].reserve_calls
        assert reserve.sampling.top_k == 0  # vLLM's -1 means "off", as 0 does here (was a 400)

    run(body())


@pytest.mark.parametrize("prompt", [["hi"], [FakeTokenizer().encode("hi")]])
def test_a_batch_of_one_prompt_is_that_prompt(prompt) -> None:
    async def body() -> dict:
        prefill, decode = fake_cluster()
        async with serve_http(prefill, decode) as (_, client):
            r = await client.post("/v1/completions", json={**TEXT, "prompt": prompt})
            assert r.status_code == 200, r.text  # was a 400: LangChain sends every prompt as a list
        (reserve,) = decode[0].reserve_calls
        assert reserve.prompt_token_ids == tuple(FakeTokenizer().encode("hi"))
        return r.json()

    assert run(body())["choices"][0]["finish_reason"] == "length"


def test_the_refused_fields_at_their_off_values_are_served() -> None:
    async def body() -> list:
        prefill, decode = fake_cluster()
        async with serve_http(prefill, decode) as (_, client):
            return [await client.post(path, json=payload) for path, payload in OFF_VALUES]

    for r in run(body()):
        assert r.status_code == 200, r.text


def test_a_trailing_slash_is_served_as_the_path_without_it() -> None:
    async def body() -> list:
        prefill, decode = fake_cluster()
        async with serve_http(prefill, decode) as (_, client):
            # Was a bodiless 307 to the slashless path: clients that don't resend a POST body got nothing.
            out = [await client.post("/v1/completions/", json=TEXT),
                   await client.post("/v1/chat/completions/", json=CHAT),
                   await client.get("/v1/models/"), await client.get("/health/")]
        assert len(decode[0].reserve_calls) == 2
        return out

    for r in run(body()):
        assert r.status_code == 200, (r.status_code, r.headers, r.text)


def test_head_is_served_on_the_reads_and_a_405_names_the_allowed_methods() -> None:
    async def body() -> tuple:
        prefill, decode = fake_cluster()
        async with serve_http(prefill, decode) as (_, client):
            heads = [await client.head(path) for path in ("/health", "/v1/models", f"/v1/models/{MODEL}")]
            wrong = [await client.get("/v1/completions"), await client.options("/v1/chat/completions")]
        return heads, wrong

    heads, wrong = run(body())
    for r in heads:
        assert r.status_code == 200 and r.content == b"", (r.status_code, r.content)
    for r in wrong:  # RFC 9110: a 405 says which methods the resource allows
        assert r.status_code == 405 and r.headers["allow"] == "POST", r.headers
        assert r.json()["error"]["type"] == "invalid_request_error"
