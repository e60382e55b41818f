"""PDServe's gRPC method handlers: safe request decoding, bearer-token auth, exceptions as clean statuses."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from proto.api import SERVICE_NAME, pb
from router.security import BearerAuth

log = logging.getLogger(__name__)

Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
StreamHandler = Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]


@dataclass(frozen=True)
class MalformedRequest:
    """What the decoder hands the handler instead of raising: gRPC would turn a raised DecodeError into
    UNKNOWN, but bytes that do not parse (or carry invalid UTF-8 in a string field) are the client's error."""

    message: str


def _decoder(cls: type[Message]) -> Callable[[bytes], Message | MalformedRequest]:
    def decode(data: bytes) -> Message | MalformedRequest:
        try:
            return cls.FromString(data)
        except DecodeError as e:
            return MalformedRequest(f"the request bytes are not a valid {cls.DESCRIPTOR.full_name}: {e}")

    return decode


async def _admit(request: Any, context: grpc.aio.ServicerContext, auth: BearerAuth | None) -> None:
    """Auth first (an unauthenticated caller learns nothing about its request), then the bytes."""
    if auth is not None:
        problem = auth.check(context.invocation_metadata())
        if problem is not None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)
    if isinstance(request, MalformedRequest):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)


async def _internal_error(name: str, e: Exception, context: grpc.aio.ServicerContext) -> None:
    log.error("%s failed", name, exc_info=e)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(e).__name__})")


def _unary(name: str, fn: Handler, auth: BearerAuth | None) -> Handler:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await _admit(request, context, auth)
        try:
            return await fn(request, context)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as e:
            await _internal_error(name, e, context)

    return call


def _stream(name: str, fn: StreamHandler, auth: BearerAuth | None) -> StreamHandler:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await _admit(request, context, auth)
        try:
            async for item in fn(request, context):
                yield item
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as e:
            await _internal_error(name, e, context)

    return call


def add_pdserve_to_server(servicer: Any, server: grpc.aio.Server, auth: BearerAuth | None) -> None:
    """Like the generated add_PDServeServicer_to_server, with every method behind the guards above; an
    unexpected exception becomes a one-line INTERNAL and its stack stays in the server log."""
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["PDServe"].methods:
        request_cls = getattr(pb, method.input_type.name)
        response_cls = getattr(pb, method.output_type.name)
        fn = getattr(servicer, method.name)
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _stream(method.name, fn, auth),
                request_deserializer=_decoder(request_cls),
                response_serializer=response_cls.SerializeToString,
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary(method.name, fn, auth),
                request_deserializer=_decoder(request_cls),
                response_serializer=response_cls.SerializeToString,
            )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
