"""Public doors: bearer-token auth (health open), TLS on gRPC and HTTP, oversize HTTP bodies refused."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import grpc
import httpx
import pytest
from fakes import fake_cluster, run, serve_router
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto.api import pb, pb_grpc
from router.security import BearerAuth, SecurityConfigError

pytestmark = pytest.mark.timeout(60)

TOKEN = "s3cret-token"


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")  # as `echo` writes it: the newline is not part of the token
    return path


@pytest.fixture
def tls_pair(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (the venv has no `cryptography`; openssl is everywhere)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def test_bearer_auth_accepts_only_the_token_and_says_why_not() -> None:
    auth = BearerAuth(TOKEN)
    assert auth.check([("authorization", f"Bearer {TOKEN}")]) is None
    assert auth.check_header(f"bearer {TOKEN}") is None  # the scheme is case-insensitive (RFC 7235)
    assert "missing credentials" in (auth.check([("x-other", "1")]) or "")
    assert "malformed credentials" in (auth.check_header(TOKEN) or "")
    assert "invalid credentials" in (auth.check_header("Bearer wrong") or "")
    with pytest.raises(SecurityConfigError, match="empty"):
        BearerAuth.from_file(Path("/dev/null"))
    with pytest.raises(SecurityConfigError, match="cannot read the auth token file"):
        BearerAuth.from_file(Path("/nonexistent/token"))


def test_grpc_needs_the_token_but_health_stays_open(token_file: Path) -> None:
    async def body() -> None:
        prefill, decode = fake_cluster()
        async with serve_router(prefill, decode, auth_token_file=str(token_file)) as h:
            for metadata, word in ((None, "missing"), ((("authorization", "Bearer nope"),), "invalid")):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await h.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert word in info.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in h.stub.Generate(pb.GenerateRequest(text="hi")):
                    pass
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            good = (("authorization", f"Bearer {TOKEN}"),)
            items = [r async for r in h.stub.Generate(pb.GenerateRequest(text="hi"), metadata=good)]
            assert items[-1].HasField("final")
            check = await health_pb2_grpc.HealthStub(h.channel).Check(health_pb2.HealthCheckRequest())
            assert check.status == health_pb2.HealthCheckResponse.SERVING

    run(body())


def test_http_needs_the_token_but_health_stays_open(token_file: Path) -> None:
    async def body() -> None:
        prefill, decode = fake_cluster()
        async with serve_router(prefill, decode, http_port=0, auth_token_file=str(token_file)) as h:
            base = f"http://127.0.0.1:{h.server.http_port}"
            async with httpx.AsyncClient(base_url=base, timeout=10.0) as client:
                denied = await client.get("/v1/models")
                assert denied.status_code == 401
                error = denied.json()["error"]
                assert error["type"] == "authentication_error" and "missing credentials" in error["message"]
                assert denied.headers["www-authenticate"] == "Bearer"
                ok = await client.get("/v1/models", headers={"Authorization": f"Bearer {TOKEN}"})
                assert ok.status_code == 200
                assert (await client.get("/health")).json() == {"status": "serving"}

    run(body())


def test_http_body_over_the_limit_is_413_with_an_openai_error_body() -> None:
    async def body() -> None:
        prefill, decode = fake_cluster()
        async with serve_router(prefill, decode, http_port=0, max_request_bytes=1000) as h:
            base = f"http://127.0.0.1:{h.server.http_port}"
            async with httpx.AsyncClient(base_url=base, timeout=10.0) as client:
                big = {"model": "fake-byte-model", "prompt": "x" * 2000}
                declared = await client.post("/v1/completions", json=big)

                async def chunks():  # no Content-Length: the limit holds while reading
                    for _ in range(3):
                        yield b"x" * 600

                streamed = await client.post("/v1/completions", content=chunks())
        for response in (declared, streamed):
            assert response.status_code == 413
            error = response.json()["error"]
            assert error["code"] == "request_too_large" and "limit of 1000 bytes" in error["message"]

    run(body())


def test_tls_on_both_doors(tls_pair: tuple[Path, Path], token_file: Path) -> None:
    cert, key = tls_pair
    tls = {"tls_cert_file": str(cert), "tls_key_file": str(key), "auth_token_file": str(token_file)}

    async def body() -> None:
        prefill, decode = fake_cluster()
        async with serve_router(prefill, decode, http_port=0, **tls) as h:
            creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
            async with grpc.aio.secure_channel(h.server.address, creds) as channel:
                good = (("authorization", f"Bearer {TOKEN}"),)
                stub = pb_grpc.PDServeStub(channel)
                info = await stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=good)
                assert info.vocab_size > 0
            # Plaintext to a TLS port fails to connect instead of being served.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await h.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=good, timeout=2)
            assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            verify = ssl.create_default_context(cafile=str(cert))
            url = f"https://127.0.0.1:{h.server.http_port}"
            async with httpx.AsyncClient(base_url=url, verify=verify, timeout=10.0) as client:
                response = await client.get("/v1/models", headers={"Authorization": f"Bearer {TOKEN}"})
                assert response.status_code == 200

    run(body(), timeout_s=20)
