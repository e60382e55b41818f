"""gRPC client calls behind `pdserve generate` and `pdserve info`."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import grpc
from google.protobuf.json_format import MessageToDict

from proto.api import pb, pb_grpc


@dataclass(frozen=True)
class GenerateOptions:
    prompt: str
    chat: bool = True  # the embedded model is an instruct model: wrap the prompt as one user message
    system: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


def _to_dict(message) -> dict:
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def build_request(opts: GenerateOptions) -> pb.GenerateRequest:
    sampling = pb.SamplingOptions(stop=list(opts.stop), ignore_eos=opts.ignore_eos)
    for name in ("max_tokens", "temperature", "top_p", "top_k", "seed"):
        value = getattr(opts, name)
        if value is not None:
            setattr(sampling, name, value)
    if not opts.chat:
        return pb.GenerateRequest(text=opts.prompt, sampling=sampling)
    messages = [pb.ChatMessage(role="system", content=opts.system)] if opts.system else []
    messages.append(pb.ChatMessage(role="user", content=opts.prompt))
    return pb.GenerateRequest(chat=pb.ChatMessages(messages=messages), sampling=sampling)


def generate(address: str, opts: GenerateOptions, as_json: bool, timeout: float | None) -> int:
    """Streams text to stdout as it arrives; as_json prints only the final message. Returns an exit code."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.PDServeStub(channel)
        final = None
        try:
            for response in stub.Generate(build_request(opts), timeout=timeout):
                if response.HasField("delta") and not as_json:
                    sys.stdout.write(response.delta.text)
                    sys.stdout.flush()
                elif response.HasField("final"):
                    final = response
        except grpc.RpcError as e:
            unreachable = e.code() == grpc.StatusCode.UNAVAILABLE and "connect" in (e.details() or "")
            hint = f" (is `pdserve up` running at {address}?)" if unreachable else ""
            print(f"\nerror: {e.code().name}: {e.details()}{hint}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # closing the stream cancels the RPC: the router aborts the request
            print("\n(cancelled)", file=sys.stderr)
            return 130
    if final is None:
        print("\nerror: stream ended without a final message", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(_to_dict(final), indent=2))
    else:
        f = final.final
        print(f"\n[{pb.FinishReason.Name(f.finish_reason).removeprefix('FINISH_REASON_').lower()}: "
              f"{f.usage.prompt_tokens} prompt + {f.usage.completion_tokens} generated tokens, "
              f"TTFT {f.timings.ttft_seconds * 1000:.0f} ms, total {f.timings.e2e_seconds:.2f} s]",
              file=sys.stderr)
    return 0


def info(address: str, timeout: float) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.PDServeStub(channel)
        try:
            model = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout)
            server = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=timeout)
        except grpc.RpcError as e:
            print(f"error: {e.code().name}: {e.details()} (is `pdserve up` running at {address}?)",
                  file=sys.stderr)
            return 1
    out = {"model": _to_dict(model),
           "server": _to_dict(server)}
    print(json.dumps(out, indent=2))
    return 0
