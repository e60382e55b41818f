"""The router: grpc.aio PDServe servicer, health, reflection, the HTTP door, worker refresh, metrics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from contracts.model_info import ModelInfo
from proto.api import SERVICE_NAME, pb, pb_grpc
from router.admission import Admission
from router.clients import DecodeClient, PrefillClient
from router.config import RouterConfig
from router.dispatch import DispatchPolicy, make_policy
from router.flow_errors import FlowError
from router.http.app import HttpDoor, build_app
from router.metrics import RouterMetrics, WorkerMetricsSource
from router.placement import make_placement
from router.reflection import enable_reflection
from router.request_flow import RequestFlow
from router.rpc_handlers import add_pdserve_to_server
from router.security import BearerAuth, TlsFiles
from router.validation import (
    InvalidRequest,
    Tokenizer,
    ValidatedRequest,
    ValidationLimits,
    input_from_proto,
    validate_off_loop,
)
from router.workers import WorkerPool

log = logging.getLogger(__name__)

HEALTH_SERVICES = ("", SERVICE_NAME)  # "" = the whole server, as health clients ask by default
REFLECTED_SERVICES = (SERVICE_NAME, health.SERVICE_NAME)  # + both reflection services (router.reflection)


class PDServeServicer(pb_grpc.PDServeServicer):
    def __init__(self, router: RouterServer) -> None:
        self._r = router

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        r = self._r
        try:
            validated = await validate_off_loop(input_from_proto(request), r.tokenizer, r.limits)
        except InvalidRequest as e:
            r.metrics.count_invalid("grpc")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if validated.request_id in r.active:
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS, f"request_id: {validated.request_id!r} is already in flight"
            )
        remaining = context.time_remaining()
        budget = (
            r.config.request_timeout_s if remaining is None else min(remaining, r.config.request_timeout_s)
        )
        flow = r.open_flow(validated, budget, api="grpc")
        try:
            async with aclosing(flow.events()) as events:  # closed now, not at GC: it holds the decode stream
                async for event in events:
                    if isinstance(event, FlowError):
                        await context.abort(event.code, event.message, _trailers(event))
                    yield event
        finally:
            flow.stop("cancelled")  # client went away (or the RPC failed): a no-op once the flow finished

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        flow = self._r.active.get(request.request_id)
        if flow is None:
            return pb.AbortResponse(found=False)
        flow.stop("abort")
        # Answer once the workers were told, so a client that sees `found` can rely on the blocks being freed.
        await flow.wait_closed(self._r.config.worker_call_timeout_s + 1.0)
        return pb.AbortResponse(found=True)

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        m = self._r.model_info
        return pb.ModelInfo(
            model_name=self._r.served_model_name,  # the name clients use (HTTP door, `info`), not GGUF's
            context_length=m.context_length,
            vocab_size=m.vocab_size,
            kv_cache_dtype=m.kv_cache_dtype,
            weight_dtype=m.weight_dtype,
            compute_dtype=m.compute_dtype,
            weights=m.weights,
            speculative=m.speculative,
        )

    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerInfo:
        r = self._r
        workers = [
            pb.WorkerStatus(
                worker_id=w.worker_id,
                role=w.role,
                state=w.state,
                free_kv_blocks=w.stats.num_free_blocks,
                total_kv_blocks=w.stats.num_total_blocks,
                running_requests=w.stats.num_running,
                queued_tokens=w.stats.queued_prefill_tokens,
                tp_size=len(w.tp_ranks),
                tp_ranks=[pb.TPRank(rank=t.rank, device=t.device, pid=t.pid, kv_heads=list(t.kv_heads))
                          for t in w.tp_ranks],
            )
            for w in sorted(r.pool.infos(), key=lambda w: (w.role, w.worker_id))
        ]
        return pb.ServerInfo(
            workers=workers,
            dispatch_policy=r.policy.name,
            queue_capacity=r.config.queue_capacity,
            queue_depth=r.admission.queue_depth,
        )


def _trailers(error: FlowError) -> tuple[tuple[str, str], ...]:
    """A retry hint rides in trailing metadata (`retry-after-ms`), as gRPC's own retry throttling reads it."""
    if error.retry_after_s is None:
        return ()
    return (("retry-after-ms", str(round(error.retry_after_s * 1000))),)



class RouterServer:
    def __init__(
        self,
        config: RouterConfig,
        pool: WorkerPool,
        tokenizer: Tokenizer,
        model_info: ModelInfo,
        policy: DispatchPolicy,
        metrics: RouterMetrics,
    ) -> None:
        self.config, self.pool, self.tokenizer, self.model_info = config, pool, tokenizer, model_info
        self.policy, self.metrics = policy, metrics
        self.placement = make_placement(config)  # shared by every flow: it learns from their prefills
        context = min(model_info.context_length, config.max_model_len or model_info.context_length)
        self.limits = ValidationLimits(
            context_length=context,
            vocab_size=model_info.vocab_size,
            default_max_tokens=config.default_max_tokens,
            max_request_id_len=config.max_request_id_len,
            max_stop_strings=config.max_stop_strings,
            max_stop_chars=config.max_stop_chars,
            max_stop_token_ids=config.max_stop_token_ids,
        )
        # Read now, so a bad file fails before anything binds.
        self.auth = BearerAuth.from_file(config.auth_token_file) if config.auth_token_file else None
        self.tls = (
            TlsFiles(config.tls_cert_file, config.tls_key_file)
            if config.tls_cert_file and config.tls_key_file
            else None
        )
        self.admission = Admission(config.queue_capacity, config.max_inflight, config.queue_retry_after_s)
        metrics.track_queue_depth(lambda: self.admission.queue_depth)
        self.active: dict[str, RequestFlow] = {}
        self.health = health.aio.HealthServicer()
        self._flow_tasks: set[asyncio.Task[None]] = set()
        self._decode_reports_seen = -1
        self._server: grpc.aio.Server | None = None
        self._http: HttpDoor | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._port: int | None = None
        self._metrics_port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("server not started")
        return self._port

    @property
    def metrics_port(self) -> int | None:
        return self._metrics_port

    @property
    def http_port(self) -> int | None:
        return self._http.port if self._http is not None else None

    @property
    def served_model_name(self) -> str:
        return self.config.served_model_name or self.model_info.model_name

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def open_flow(self, request: ValidatedRequest, budget_s: float, api: str) -> RequestFlow:
        """Start one request's flow; both doors come through here (admission, dispatch, abort, metrics)."""
        flow = RequestFlow(
            request,
            pool=self.pool,
            policy=self.policy,
            placement=self.placement,
            admission=self.admission,
            metrics=self.metrics,
            config=self.config,
            budget_s=budget_s,
            api=api,
        )
        rid = request.request_id
        self.active[rid] = flow
        task = flow.start()
        self._flow_tasks.add(task)

        def forget(t: asyncio.Task[None]) -> None:
            self._flow_tasks.discard(t)
            if self.active.get(rid) is flow:
                del self.active[rid]

        task.add_done_callback(forget)
        return flow

    async def _after_refresh(self) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self.pool.serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in HEALTH_SERVICES:
            await self.health.set(name, status)
        self.metrics.update_gauges(self.pool.infos())
        # The in-flight bound follows the decode workers' sequence slots; a changed report may show room.
        self.admission.set_capacity(self.pool.decode_slots())
        if self.pool.decode_reports_changed != self._decode_reports_seen:
            self._decode_reports_seen = self.pool.decode_reports_changed
            self.admission.room_changed()

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("server already started")
        for name in HEALTH_SERVICES:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        options = [
            # No SO_REUSEPORT: a second router on the same port must fail to bind, not silently share it.
            # (gRPC sets SO_REUSEADDR itself, so a restart binds over TIME_WAIT connections.)
            ("grpc.so_reuseport", 0),
            # Larger requests end RESOURCE_EXHAUSTED in gRPC itself, before any handler or parser sees them.
            ("grpc.max_receive_message_length", self.config.max_request_bytes),
        ]
        server = grpc.aio.server(options=options)
        add_pdserve_to_server(PDServeServicer(self), server, self.auth)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)  # open: probes carry no token
        enable_reflection(REFLECTED_SERVICES, server)
        bind = f"{self.config.host}:{self.config.port}"
        if self.tls is None:
            self._port = server.add_insecure_port(bind)
        else:
            self._port = server.add_secure_port(bind, self.tls.grpc_credentials())
        if self._port == 0:
            raise OSError(f"could not bind {self.config.host}:{self.config.port}")
        await server.start()
        self._server = server
        if self.config.http_port is not None:
            http = HttpDoor(
                build_app(self, self.served_model_name), self.config.host, self.config.http_port, tls=self.tls
            )
            try:
                await http.start()
            except BaseException:
                await server.stop(None)
                self._server = None
                raise
            self._http = http
        if self.metrics.worker_source is not None:
            self.metrics.worker_source.bind(asyncio.get_running_loop())
        if self.config.metrics_port is not None:
            httpd = self.metrics.start_metrics_server(self.config.metrics_port, self.config.metrics_host)
            self._metrics_port = httpd.server_port
        await self.pool.refresh()  # health and dispatch are right from the first request
        await self._after_refresh()
        self._refresher = asyncio.create_task(
            self.pool.run_refresher(self.config.worker_refresh_s, self._after_refresh), name="worker-refresh"
        )
        log.info(
            "router listening on %s (HTTP port %s, metrics port %s)",
            self.address,
            self.http_port,
            self._metrics_port,
        )

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting requests on both doors, let running streams finish for `grace` seconds (the drain
        on Ctrl-C), then abort what is left and close the ports."""
        if self._server is None:
            return
        await self.health.enter_graceful_shutdown()  # NOT_SERVING from now on: balancers stop sending
        if self._http is not None:
            self._http.begin_shutdown(grace)  # no new HTTP requests; those in flight end with their flows
        drain = [self._server.stop(grace)]  # no new RPCs; running ones get `grace` seconds
        if grace and self._flow_tasks:
            drain.append(asyncio.wait(set(self._flow_tasks), timeout=grace))  # HTTP streams too
        await asyncio.gather(*drain)
        if self._refresher is not None:  # kept until here: draining and queued flows still dispatch
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
        for flow in list(self.active.values()):
            flow.stop("cancelled")
        if self._flow_tasks:
            await asyncio.wait(set(self._flow_tasks), timeout=self.config.worker_call_timeout_s + 1.0)
        if self._http is not None:
            await self._http.stop()
            self._http = None
        self.metrics.stop_metrics_server()
        self._server = None

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


def build_server(
    config: RouterConfig,
    prefill_clients: Sequence[PrefillClient],
    decode_clients: Sequence[DecodeClient],
    tokenizer: Tokenizer,
    model_info: ModelInfo,
) -> RouterServer:
    policy = make_policy(config.dispatch_policy)  # unknown names fail here, before anything binds
    pool = WorkerPool(
        prefill_clients,
        decode_clients,
        call_timeout_s=config.worker_call_timeout_s,
        heartbeat_timeout_s=config.worker_heartbeat_timeout_s,
    )
    source = WorkerMetricsSource(pool.clients(), timeout_s=min(2.0, config.worker_call_timeout_s))
    return RouterServer(config, pool, tokenizer, model_info, policy, RouterMetrics(source))
