"""Router validation: each bad field is rejected with an error naming it, over the function and over gRPC."""

from __future__ import annotations

import grpc
import pytest
from fakes import FAKE_MODEL, FakeTokenizer, fake_cluster, run, serve_router

from proto.api import pb
from router.validation import (
    ChatMessage,
    GenerateInput,
    InvalidRequest,
    ValidationLimits,
    input_from_proto,
    input_to_proto,
    validate_request,
)

pytestmark = pytest.mark.timeout(60)

LIMITS = ValidationLimits(
    context_length=FAKE_MODEL.context_length,
    vocab_size=FAKE_MODEL.vocab_size,
    default_max_tokens=64,
    max_request_id_len=128,
)
S = pb.SamplingOptions
CTX = FAKE_MODEL.context_length

# (case name, request, field the error must name)
BAD_REQUESTS = [
    ("no input", pb.GenerateRequest(), "input"),
    ("empty text", pb.GenerateRequest(text=""), "text"),
    ("empty token ids", pb.GenerateRequest(token_ids=pb.TokenIds(ids=[])), "token_ids"),
    ("negative token id", pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, -1])), "token_ids[1]"),
    (
        "token id past vocab",
        pb.GenerateRequest(token_ids=pb.TokenIds(ids=[FAKE_MODEL.vocab_size])),
        "token_ids[0]",
    ),
    ("empty chat", pb.GenerateRequest(chat=pb.ChatMessages()), "chat"),
    (
        "bad chat role",
        pb.GenerateRequest(
            chat=pb.ChatMessages(
                messages=[
                    pb.ChatMessage(role="user", content="hi"),
                    pb.ChatMessage(role="robot", content="x"),
                ]
            )
        ),
        "chat.messages[1].role",
    ),
    ("max_tokens zero", pb.GenerateRequest(text="hi", sampling=S(max_tokens=0)), "sampling.max_tokens"),
    ("max_tokens negative", pb.GenerateRequest(text="hi", sampling=S(max_tokens=-3)), "sampling.max_tokens"),
    (
        "prompt + max_tokens over context",
        pb.GenerateRequest(text="hello", sampling=S(max_tokens=CTX - 4)),
        "sampling.max_tokens",
    ),
    ("prompt alone fills context", pb.GenerateRequest(text="x" * CTX), "input"),
    (
        "negative temperature",
        pb.GenerateRequest(text="hi", sampling=S(temperature=-0.5)),
        "sampling.temperature",
    ),
    (
        "nan temperature",
        pb.GenerateRequest(text="hi", sampling=S(temperature=float("nan"))),
        "sampling.temperature",
    ),
    ("top_p zero", pb.GenerateRequest(text="hi", sampling=S(top_p=0.0)), "sampling.top_p"),
    ("top_p above one", pb.GenerateRequest(text="hi", sampling=S(top_p=1.5)), "sampling.top_p"),
    ("negative top_k", pb.GenerateRequest(text="hi", sampling=S(top_k=-1)), "sampling.top_k"),
    (
        "stop token id past vocab",
        pb.GenerateRequest(text="hi", sampling=S(stop_token_ids=[1, 10**6])),
        "sampling.stop_token_ids[1]",
    ),
    (
        "negative stop token id",
        pb.GenerateRequest(text="hi", sampling=S(stop_token_ids=[-2])),
        "sampling.stop_token_ids[0]",
    ),
    ("empty stop string", pb.GenerateRequest(text="hi", sampling=S(stop=["ok", ""])), "sampling.stop[1]"),
    ("request id too long", pb.GenerateRequest(request_id="r" * 129, text="hi"), "request_id"),
    ("request id with control char", pb.GenerateRequest(request_id="a\nb", text="hi"), "request_id"),
]


@pytest.mark.parametrize("name,request_,field", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_field_raises_invalid_request_naming_it(
    name: str, request_: pb.GenerateRequest, field: str
) -> None:
    with pytest.raises(InvalidRequest) as info:
        validate_request(request_, FakeTokenizer(), LIMITS)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


def test_every_bad_field_becomes_invalid_argument_over_grpc() -> None:
    async def body() -> list[tuple[str, grpc.StatusCode, str]]:
        prefill, decode = fake_cluster()
        seen = []
        async with serve_router(prefill, decode) as h:
            for _name, request_, field in BAD_REQUESTS:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for _ in h.stub.Generate(request_):
                        pass
                seen.append((field, info.value.code(), info.value.details()))
        assert not decode[0].reserve_calls, "invalid requests must never reach a worker"
        return seen

    for field, code, details in run(body(), timeout_s=20):
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.startswith(f"{field}: ")


def test_text_is_tokenized_and_unset_sampling_takes_defaults() -> None:
    v = validate_request(pb.GenerateRequest(request_id="r1", text="hi"), FakeTokenizer(), LIMITS)
    assert v.request_id == "r1"
    assert v.prompt_token_ids == tuple(FakeTokenizer().encode("hi"))
    assert (v.sampling.max_tokens, v.sampling.temperature, v.sampling.top_p, v.sampling.top_k) == (
        64,
        0.0,
        1.0,
        0,
    )
    assert v.sampling.seed is None


def test_chat_goes_through_the_chat_template() -> None:
    chat = pb.ChatMessages(
        messages=[
            pb.ChatMessage(role="system", content="be brief"),
            pb.ChatMessage(role="user", content="hi"),
        ]
    )
    v = validate_request(pb.GenerateRequest(chat=chat), FakeTokenizer(), LIMITS)
    expected = FakeTokenizer().apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    )
    assert v.prompt_token_ids == tuple(expected)


def test_token_ids_and_explicit_sampling_pass_through() -> None:
    opts = S(
        max_tokens=7,
        temperature=0.5,
        top_p=0.5,
        top_k=40,
        seed=123,
        stop=["\n"],
        stop_token_ids=[0],
        ignore_eos=True,
    )
    v = validate_request(
        pb.GenerateRequest(token_ids=pb.TokenIds(ids=[4, 5, 6]), sampling=opts), FakeTokenizer(), LIMITS
    )
    s = v.sampling
    assert v.prompt_token_ids == (4, 5, 6)
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed) == (7, 0.5, 0.5, 40, 123)
    assert (s.stop, s.stop_token_ids, s.ignore_eos) == (("\n",), (0,), True)


def test_unset_max_tokens_is_clamped_to_the_room_left_in_the_context() -> None:
    text = "x" * (CTX - 10)
    v = validate_request(pb.GenerateRequest(text=text), FakeTokenizer(), LIMITS)
    assert v.sampling.max_tokens == 10


def test_missing_request_id_gets_a_fresh_unique_one() -> None:
    ids = {
        validate_request(pb.GenerateRequest(text="hi"), FakeTokenizer(), LIMITS).request_id for _ in range(3)
    }
    assert len(ids) == 3 and all(ids)


@pytest.mark.parametrize("request_input", [
    GenerateInput(text="hi"),
    GenerateInput(request_id="r1", token_ids=(5, 6), max_tokens=3, temperature=0.0, top_p=0.5, top_k=2,
                  seed=0, stop=("x",), stop_token_ids=(9,), ignore_eos=True),
    GenerateInput(chat=(ChatMessage("system", "be brief"), ChatMessage("user", "hi")), temperature=1.5),
])
def test_a_clients_request_reads_back_as_it_was_sent(request_input: GenerateInput) -> None:
    """input_to_proto (what `pdserve generate` sends) and input_from_proto (what the router reads) are
    inverses: set fields, zeros included, stay set; unset ones stay unset."""
    assert input_from_proto(input_to_proto(request_input)) == request_input
