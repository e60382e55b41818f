"""gRPC client calls behind `pdserve generate` and `pdserve info`."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

import grpc
from google.protobuf.json_format import MessageToDict

from proto.api import pb, pb_grpc
from router.security import read_secret_file
from router.validation import ChatMessage, GenerateInput, input_to_proto


@dataclass(frozen=True)
class Connection:
    """Where the router is and how to reach it: TLS when a CA is given, a bearer token when one is."""

    address: str
    tls_ca: bytes | None = None
    auth_token: str | None = None

    @classmethod
    def from_flags(cls, args: argparse.Namespace) -> Connection:
        """Raises SecurityConfigError naming a file that cannot be read."""
        ca = read_secret_file(args.tls_ca, "TLS CA certificate") if args.tls_ca else None
        token = read_secret_file(args.auth_token_file, "auth token") if args.auth_token_file else None
        return cls(args.address, ca, token.decode(errors="replace").strip() if token else None)

    def channel(self) -> grpc.Channel:
        if self.tls_ca is None:
            return grpc.insecure_channel(self.address)
        return grpc.secure_channel(self.address, grpc.ssl_channel_credentials(root_certificates=self.tls_ca))

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.auth_token}"),) if self.auth_token else ()


def _to_dict(message) -> dict:
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def chat_messages(prompt: str, system: str | None = None) -> tuple[ChatMessage, ...]:
    """The prompt as one user message, after the system message when there is one."""
    return ((ChatMessage("system", system),) if system else ()) + (ChatMessage("user", prompt),)


def _end_line(text: str) -> None:
    """Text ends with a newline on stdout, so a pipe (`| wc -l`, a file) gets whole lines."""
    if text and not text.endswith("\n"):
        sys.stdout.write("\n")
        sys.stdout.flush()


def generate(conn: Connection, request: GenerateInput, as_json: bool, timeout: float | None) -> int:
    """Streams text to stdout as it arrives; as_json prints one object (text and final message) at the end.
    Returns an exit code."""
    address = conn.address
    with conn.channel() as channel:
        stub = pb_grpc.PDServeStub(channel)
        final, parts = None, []
        try:
            for response in stub.Generate(input_to_proto(request), timeout=timeout, metadata=conn.metadata):
                if response.HasField("delta"):
                    parts.append(response.delta.text)
                    if not as_json:
                        sys.stdout.write(response.delta.text)
                        sys.stdout.flush()
                elif response.HasField("final"):
                    final = response
        except grpc.RpcError as e:
            if not as_json:
                _end_line("".join(parts))
            unreachable = e.code() == grpc.StatusCode.UNAVAILABLE and "connect" in (e.details() or "")
            hint = f" (is `pdserve up` running at {address}?)" if unreachable else ""
            print(f"error: {e.code().name}: {e.details()}{hint}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # closing the stream cancels the RPC: the router aborts the request
            if not as_json:
                _end_line("".join(parts))
            print("(cancelled)", file=sys.stderr)
            return 130
    text = "".join(parts)
    if final is None:
        if not as_json:
            _end_line(text)
        print("error: stream ended without a final message", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps({"text": text, **_to_dict(final)}, indent=2))
    else:
        _end_line(text)
        f = final.final
        spec = ""
        if f.usage.draft_tokens:
            spec = f", {f.usage.accepted_draft_tokens}/{f.usage.draft_tokens} draft tokens accepted"
        print(f"[{pb.FinishReason.Name(f.finish_reason).removeprefix('FINISH_REASON_').lower()}: "
              f"{f.usage.prompt_tokens} prompt + {f.usage.completion_tokens} generated tokens{spec}, "
              f"TTFT {f.timings.ttft_seconds * 1000:.0f} ms, total {f.timings.e2e_seconds:.2f} s]",
              file=sys.stderr)
    return 0


def info(conn: Connection, timeout: float) -> int:
    with conn.channel() as channel:
        stub = pb_grpc.PDServeStub(channel)
        try:
            model = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout, metadata=conn.metadata)
            server = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=timeout, metadata=conn.metadata)
        except grpc.RpcError as e:
            hint = "" if e.code() == grpc.StatusCode.UNAUTHENTICATED else \
                f" (is `pdserve up` running at {conn.address}?)"
            print(f"error: {e.code().name}: {e.details()}{hint}", file=sys.stderr)
            return 1
    out = {"model": _to_dict(model),
           "server": _to_dict(server)}
    print(json.dumps(out, indent=2))
    return 0
