"""The HTTP door's FastAPI app (/v1/models, /v1/completions, /v1/chat/completions, /health) and its server."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from router.flow_errors import FlowError
from router.http.mapping import (
    ApiError,
    ResponseShape,
    chat_input,
    completion_input,
    flow_error_to_api,
    invalid_to_api,
    parse_body,
)
from router.http.schemas import ChatCompletionRequest, CompletionRequest
from router.http.sse import sse_stream
from router.request_flow import RequestFlow
from router.security import AUTH_HEADER, TlsFiles
from router.validation import InvalidRequest, new_request_id, validate_off_loop

if TYPE_CHECKING:
    from router.server import RouterServer


def build_app(router: RouterServer, served_model: str) -> FastAPI:
    """Routes onto `router`: the same validation, admission, dispatch and RequestFlow as the gRPC door."""
    # No slash redirects: a 307 carries no body and many clients don't resend a POST's body; _TrailingSlash
    # serves `/v1/completions/` as `/v1/completions` instead.
    app = FastAPI(title="pdserve", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)
    app.add_middleware(_TrailingSlash)
    created = int(time.time())
    # Model ids match without regard to case: the and the field's spelling (smollm2-135m-instruct) and
    # the model card's (SmolLM2-135M-Instruct) both name the one model served.
    names = {served_model.casefold(), router.model_info.model_name.casefold()}

    def model_card() -> dict[str, Any]:
        return {
            "id": served_model,
            "object": "model",
            "created": created,
            "owned_by": "pdserve",
            "max_model_len": router.limits.context_length,
        }

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> Response:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.middleware("http")
    async def authenticate(request: Request, call_next: Any) -> Response:
        # The API needs the token; /health stays open for probes and load balancers, like gRPC health.
        if router.auth is not None and request.url.path.startswith("/v1/"):
            problem = router.auth.check_header(request.headers.get(AUTH_HEADER))
            if problem is not None:
                error = ApiError(401, problem, type="authentication_error", code="invalid_api_key")
                return JSONResponse(error.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> Response:  # unknown path, wrong method
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        error = ApiError(e.status_code, str(e.detail), type=kind)
        return JSONResponse(error.body(), status_code=e.status_code, headers=e.headers)  # 405's Allow

    # HEAD as well as GET on the reads: probes and `curl -I` use it (uvicorn sends no body for HEAD).
    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> Response:
        serving = router.pool.serving
        body = {"status": "serving" if serving else "not_serving"}
        return JSONResponse(body, status_code=200 if serving else 503)

    @app.api_route("/v1/models", methods=["GET", "HEAD"])
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.api_route("/v1/models/{model:path}", methods=["GET", "HEAD"])
    async def get_model(model: str) -> dict[str, Any]:
        if model.casefold() not in names:
            raise _unknown_model(model, served_model)
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(router, request, chat=False, names=names, served_model=served_model)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(router, request, chat=True, names=names, served_model=served_model)

    return app


def _unknown_model(model: str, served: str) -> ApiError:
    return ApiError(
        404,
        f"model {model!r} is not served here; this server serves {served!r}",
        type="not_found_error",
        param="model",
        code="model_not_found",
    )


async def _generate(
    router: RouterServer, request: Request, *, chat: bool, names: set[str], served_model: str
) -> Response:
    try:
        raw = await _read_body(request, router.config.max_request_bytes)
        body = parse_body(raw, ChatCompletionRequest if chat else CompletionRequest)
        rid = new_request_id()
        given = chat_input(body, rid) if chat else completion_input(body, rid)
        try:
            validated = await validate_off_loop(given, router.tokenizer, router.limits)
        except InvalidRequest as e:
            raise invalid_to_api(e, body) from None
    except ApiError:
        router.metrics.count_invalid("http")
        raise
    if body.model.casefold() not in names:
        raise _unknown_model(body.model, served_model)

    shape = ResponseShape(id=f"{'chatcmpl' if chat else 'cmpl'}-{rid}", model=body.model, chat=chat)
    flow = router.open_flow(validated, router.config.request_timeout_s, api="http")
    watcher = asyncio.create_task(_stop_on_disconnect(request, flow))

    events = flow.events()

    async def close() -> None:  # however the response ends; stop() is a no-op once the flow finished
        watcher.cancel()
        flow.stop("cancelled")
        await events.aclose()  # now, not at GC: the generator holds the decode stream
    try:
        # Wait for the first event before any header goes out, so a full queue is a 429, not a broken stream.
        first = await anext(events)
    except BaseException:
        await close()
        raise
    if isinstance(first, FlowError):
        await close()
        raise flow_error_to_api(first)
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(
            sse_stream(shape, first, events, include_usage, close),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    try:
        text, event = "", first
        while event.HasField("delta"):
            text += event.delta.text
            event = await anext(events)
            if isinstance(event, FlowError):
                raise flow_error_to_api(event)
    finally:
        await close()
    return JSONResponse(shape.completion(text, event.final))


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 once it passes `limit` bytes (declared or streamed): never held whole."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise _too_large(None, limit)
    return bytes(raw)


def _too_large(size: int | None, limit: int) -> ApiError:
    got = f" (got {size} bytes)" if size is not None else ""
    return ApiError(
        413,
        f"the request body is larger than this server's limit of {limit} bytes{got}",
        code="request_too_large",
    )


async def _stop_on_disconnect(request: Request, flow: RequestFlow) -> None:
    """A client that hangs up aborts its request (and so frees its KV blocks), streamed or not."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    flow.stop("cancelled")


class _TrailingSlash:
    """ASGI middleware: trailing slashes are dropped before routing (`/v1/models/` is `/v1/models`)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and len(path) > 1 and path.endswith("/"):
            raw = scope.get("raw_path")
            scope = {**scope, "path": path.rstrip("/") or "/"}
            if raw:
                scope["raw_path"] = raw.rstrip(b"/") or b"/"
        await self.app(scope, receive, send)


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the router process owns SIGINT/SIGTERM (deploy/launcher stops the router, which stops us)


class HttpDoor:
    """uvicorn serving the app on the router's own event loop. The socket is bound in start(), so a taken
    port fails there, and port 0 reports the port it got."""

    def __init__(
        self, app: FastAPI, host: str, port: int, shutdown_timeout_s: float = 5.0, tls: TlsFiles | None = None
    ) -> None:
        self._host, self._requested_port = host, port
        config = uvicorn.Config(
            app,
            lifespan="off",
            ssl_certfile=tls.cert_file if tls else None,
            ssl_keyfile=tls.key_file if tls else None,
            log_config=None,  # leave the process's logging alone
            access_log=False,
            timeout_graceful_shutdown=shutdown_timeout_s,
        )
        self._server = _EmbeddedServer(config)
        self._task: asyncio.Task[None] | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("HTTP door not started")
        return self._port

    async def start(self) -> None:
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            # Lets a restart bind over TIME_WAIT connections; a second live listener still fails.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self._host, self._requested_port))
        except OSError:
            sock.close()
            raise
        self._port = sock.getsockname()[1]
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="http-door")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # start-up failed: raise its error here
                raise RuntimeError("the HTTP server stopped during start-up")
            await asyncio.sleep(0.01)

    def begin_shutdown(self, grace_s: float | None = None) -> None:
        """Stop accepting; requests in flight end as their flows end. uvicorn cancels responses still running
        `timeout_graceful_shutdown` after this, so a drain longer than that raises it first."""
        config = self._server.config
        if grace_s is not None and grace_s > config.timeout_graceful_shutdown:
            config.timeout_graceful_shutdown = grace_s
        self._server.should_exit = True

    async def stop(self) -> None:
        if self._task is None:
            return
        self.begin_shutdown()
        await self._task
        self._task = None
