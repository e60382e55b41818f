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
