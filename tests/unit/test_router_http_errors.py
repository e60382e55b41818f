"""The HTTP door's failures: 400 bodies naming the field, 404, 429 + Retry-After, 503, disconnects abort."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fakes import FAKE_MODEL, fake_cluster, run, serve_http, wait_until

pytestmark = pytest.mark.timeout(60)

MODEL = FAKE_MODEL.model_name
CHAT: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
TEXT: dict[str, Any] = {"model": MODEL, "prompt": "hi"}
CTX = FAKE_MODEL.context_length

# (case, path, body (dict, or raw bytes), the `param` the 400 must name; None = the body as a whole)
BAD = [
    ("malformed JSON", "chat", b'{"model": "m", "messages": [', None),
    ("body not an object", "chat", b"[1, 2]", None),
    (
        "invalid UTF-8 in a string",
        "chat",
        b'{"model": "m", "messages": [{"role": "user", "content": "\xc3\x28"}]}',
        None,
    ),
    ("too many stop strings", "chat", {**CHAT, "stop": ["s"] * 33}, "stop"),
    ("stop string too long", "chat", {**CHAT, "stop": ["s" * 257]}, "stop[0]"),
    ("missing model", "chat", {"messages": CHAT["messages"]}, "model"),
    ("missing messages", "chat", {"model": MODEL}, "messages"),
    ("temperature as string", "chat", {**CHAT, "temperature": "0.5"}, "temperature"),
    ("max_tokens as bool", "chat", {**CHAT, "max_tokens": True}, "max_tokens"),
    ("max_tokens as float", "text", {**TEXT, "max_tokens": 2.5}, "max_tokens"),
    ("negative temperature", "chat", {**CHAT, "temperature": -1}, "temperature"),
    ("top_p zero", "text", {**TEXT, "top_p": 0}, "top_p"),
    ("negative top_k", "chat", {**CHAT, "top_k": -2}, "top_k"),
    ("max_tokens zero", "chat", {**CHAT, "max_tokens": 0}, "max_tokens"),
    (
        "max_completion_tokens past context",
        "chat",
        {**CHAT, "max_completion_tokens": CTX},
        "max_completion_tokens",
    ),
    (
        "both max fields",
        "chat",
        {**CHAT, "max_tokens": 2, "max_completion_tokens": 2},
        "max_completion_tokens",
    ),
    ("negative seed", "text", {**TEXT, "seed": -1}, "seed"),
    ("n of two", "chat", {**CHAT, "n": 2}, "n"),
    ("chat logprobs", "chat", {**CHAT, "logprobs": True}, "logprobs"),
    ("completion logprobs", "text", {**TEXT, "logprobs": 3}, "logprobs"),
    ("echo", "text", {**TEXT, "echo": True}, "echo"),
    ("stop of wrong type", "chat", {**CHAT, "stop": 3}, "stop"),
    ("empty stop string", "chat", {**CHAT, "stop": ""}, "stop"),
    ("empty stop in list", "chat", {**CHAT, "stop": ["a", ""]}, "stop[1]"),
    ("unknown role", "chat", {**CHAT, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ("no messages", "chat", {**CHAT, "messages": []}, "messages"),
    (
        "image part",
        "chat",
        {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        "messages[0].content[0]",
    ),
    (
        "content of wrong type",
        "chat",
        {**CHAT, "messages": [{"role": "user", "content": 5}]},
        "messages[0].content",
    ),
    ("empty prompt", "text", {**TEXT, "prompt": ""}, "prompt"),
    ("token id past vocab", "text", {**TEXT, "prompt": [1, FAKE_MODEL.vocab_size]}, "prompt[1]"),
    ("batched prompts", "text", {**TEXT, "prompt": ["a", "b"]}, "prompt"),
    ("prompt fills the context", "text", {**TEXT, "prompt": "x" * CTX}, "prompt"),
]
PATHS = {"chat": "/v1/chat/completions", "text": "/v1/completions"}


def test_every_bad_field_is_a_400_with_openais_error_body_naming_it() -> None:
    async def body() -> list[tuple[str, int, dict]]:
        prefill, decode = fake_cluster()
        async with serve_http(prefill, decode) as (h, client):
            out = []
            for case, path, payload, _ in BAD:
                kw = {"content": payload} if isinstance(payload, bytes) else {"json": payload}
                r = await client.post(PATHS[path], headers={"content-type": "application/json"}, **kw)
                out.append((case, r.status_code, r.json()))
            invalid = h.server.metrics.registry.get_sample_value(
                "pdserve_requests_total", {"outcome": "invalid", "api": "http"}
            )
        assert not decode[0].reserve_calls  # nothing bad reached a worker
        assert invalid == len(BAD)
        return out

    for (case, status, got), (_, _, _, param) in zip(run(body()), BAD, strict=True):
        assert status == 400, (case, got)
        assert set(got) == {"error"} and set(got["error"]) == {"message", "type", "param", "code"}, case
        assert got["error"]["type"] == "invalid_request_error", case
        assert got["error"]["param"] == param, (case, got)
        if param is not None:
            assert got["error"]["message"].startswith(f"{param}: "), (case, got)


def test_unknown_model_is_404_model_not_found() -> None:
    async def body() -> tuple[int, dict]:
        prefill, decode = fake_cluster()
        async with serve_http(prefill, decode) as (_, client):
            r = await client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-4o"})
        assert not decode[0].reserve_calls
        return r.status_code, r.json()

    status, got = run(body())
    assert status == 404
    assert got["error"]["param"] == "model" and got["error"]["code"] == "model_not_found"
    assert "gpt-4o" in got["error"]["message"] and MODEL in got["error"]["message"]


def test_full_queue_is_429_with_retry_after_for_streams_too() -> None:
    async def body() -> None:
        prefill, decode = fake_cluster()
        prefill[0].hang = True  # the first request holds the only in-flight slot
        async with serve_http(prefill, decode, max_inflight=1, queue_capacity=0) as (h, client):
            hold = asyncio.create_task(client.post("/v1/completions", json=TEXT))
            await wait_until(lambda: prefill[0].prefill_calls, what="first request to be dispatched")
            for stream in (False, True):
                r = await client.post("/v1/completions", json={**TEXT, "stream": stream})
                assert r.status_code == 429, r.text
                assert r.headers["retry-after"] == "1"
                err = r.json()["error"]
                assert err["type"] == "rate_limit_error" and "queue full" in err["message"]
            hold.cancel()
            await asyncio.gather(hold, return_exceptions=True)

    run(body())


def test_no_ready_worker_is_503() -> None:
    async def body() -> tuple[int, dict]:
        prefill, decode = fake_cluster()
        decode[0].state = "starting"
        async with serve_http(prefill, decode, decode_ready_wait_s=0.2) as (_, client):
            r = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        return r.status_code, r.json()

    status, got = run(body())
    assert status == 503 and got["error"]["type"] == "service_unavailable"
    assert "no decode worker is ready" in got["error"]["message"]


def test_worker_failure_mid_stream_is_an_error_event_then_done() -> None:
    async def body() -> str:
        prefill, decode = fake_cluster(fail_with="KV transfer failed")
        async with serve_http(prefill, decode) as (_, client):
            r = await client.post("/v1/completions", json={**TEXT, "max_tokens": 5, "stream": True})
            assert r.status_code == 200  # the first token went out before the failure
        return r.text

    events = run(body()).split("\n\n")
    assert events[-3].startswith('data: {"error":{') and "KV transfer failed" in events[-3]
    assert events[-2:] == ["data: [DONE]", ""]


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "non-streaming"])
def test_client_disconnect_aborts_the_request_once_and_frees_its_blocks(stream: bool) -> None:
    async def body() -> None:
        prefill, decode = fake_cluster(step_delay_s=0.02)
        async with serve_http(prefill, decode) as (h, client):
            payload = {**CHAT, "max_tokens": 200, "stream": stream}
            if stream:
                async with client.stream("POST", "/v1/chat/completions", json=payload) as r:
                    async for line in r.aiter_lines():
                        if '"content":"a"' in line:
                            break  # leaving the block closes the connection mid-stream
            else:
                request = asyncio.create_task(client.post("/v1/chat/completions", json=payload))
                await wait_until(lambda: decode[0].streams_opened, what="decoding to start")
                request.cancel()
                await asyncio.gather(request, return_exceptions=True)
            await wait_until(lambda: decode[0].abort_calls, what="the decode worker to be told")
            await wait_until(lambda: not h.server.active, what="the flow to finish")
            await asyncio.sleep(0.1)  # nothing fires a second time later
            cancelled = h.server.metrics.registry.get_sample_value(
                "pdserve_requests_total", {"outcome": "cancelled", "api": "http"}
            )
        (rid,) = [c.request_id for c in decode[0].reserve_calls]
        assert decode[0].abort_calls == [rid] and prefill[0].abort_calls == [rid]
        assert len(decode[0].free_blocks) == decode[0].num_total_blocks
        assert cancelled == 1

    run(body(), timeout_s=15)
