"""Starts a local cluster: Ray, worker actors, KV channels, the router (gRPC, HTTP, metrics)."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contracts.model_info import ModelInfo
from deploy.affinity import allowed_cores, plan_affinity
from deploy.ray_connect import init_ray, use_token_auth_if_available
from engine.config import EngineConfig
from engine.spec.config import SpecConfig
from router.config import RouterConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterConfig:
    engine: EngineConfig
    num_prefill: int = 1
    num_decode: int = 1
    # Tensor-parallel ranks per worker of each role (--prefill-tp/--decode-tp): engine.tp_size is replaced
    # by these per role; the two may differ (the KV moves as whole heads: docs/architecture.md).
    prefill_tp: int = 1
    decode_tp: int = 1
    # The router's settings, as given (`pdserve up`'s flags build it); the launcher adds only what it learns
    # from the workers when the router starts: max_model_len and, when unset, the model's served name.
    router: RouterConfig = RouterConfig()
    ray_address: str | None = None  # None: start a private local Ray instance
    # Custom Ray resources each role's actors ask for, so roles land on the nodes that declare them (a node
    # started with `ray start --resources '{"pdserve_decode": 1}'`, a KubeRay worker group). None: the
    # defaults below on a joined cluster, nothing on a private one.
    prefill_resources: dict[str, float] | None = None
    decode_resources: dict[str, float] | None = None
    # Healing: Ray restarts a dead worker process up to this many times (-1 = always); a request on a dead
    # decode worker moves to another (or the restarted) one up to router.migration_limit times.
    max_worker_restarts: int = -1
    ready_file: str | None = None  # written with the bound addresses once the router serves
    drain_seconds: float = 10.0  # on SIGINT/SIGTERM, running streams get this long to finish
    admin_port: int = 50052  # `pdserve scale` talks to the launcher here, on loopback only; 0 = any free port
    # --cpu-affinity auto: each worker process pinned to its own cores (deploy/affinity.py), torch threads =
    # its cores; False: the OS places them and the threads split os.cpu_count() (below).
    cpu_affinity: bool = False

    def role_resources(self, role: str) -> dict[str, float] | None:
        """On a joined cluster the node types declare custom resources (deploy/ray-cluster.yaml, kuberay.yaml)
        that pin each role to its worker group; a private local Ray has none."""
        given = self.prefill_resources if role == "prefill" else self.decode_resources
        if given is not None:
            return given or None
        return None if self.ray_address is None else {f"pdserve_{role}": 1}


_QUANT_SUFFIX = re.compile(r"[.-](q\d\w*|iq\d\w*|f16|f32|bf16)$", re.IGNORECASE)


def served_model_name(model_path: Path) -> str:
    """The name clients see (HTTP model id, GetModelInfo, `pdserve info`): the file or directory name as the
    model card spells it, without the GGUF quantization tag (SmolLM2-135M-Instruct.Q4_1.gguf ->
    SmolLM2-135M-Instruct). Not GGUF's general.name, which converters mangle ("Smollm2 135M 8k ...")."""
    name = model_path.name.removesuffix(model_path.suffix) if model_path.is_file() else model_path.name
    return _QUANT_SUFFIX.sub("", name)


def served_model_info(reported: ModelInfo, engine: EngineConfig) -> ModelInfo:
    """The decode worker reports the model's window; a sequence must also fit one worker's KV cache (the
    scheduler's max_len), so clients see, and router validation checks, the smaller of the two: a request that
    could never fit is INVALID_ARGUMENT up front, not UNAVAILABLE from a worker or cut short as `length`."""
    kv_tokens = engine.num_kv_blocks * engine.block_size
    return dataclasses.replace(reported, context_length=min(reported.context_length, kv_tokens))


def _status(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _wait_with_progress(refs: list, what: str) -> list:
    """Blocks on Ray refs, redrawing one line with the count done and the elapsed time."""
    import ray

    start, spinner, pending, done = time.monotonic(), itertools.cycle("|/-\\"), list(refs), 0
    tty = sys.stderr.isatty()
    while pending:
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=0.25)
        done += len(ready)
        line = f"  {next(spinner)} {what}: {done}/{len(refs)} ready, {time.monotonic() - start:5.1f} s"
        if tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
    if tty:
        print(file=sys.stderr)
    _status(f"  {what}: {len(refs)}/{len(refs)} ready in {time.monotonic() - start:.1f} s")
    return ray.get(refs)  # re-raises a worker's start-up error


class LocalCluster:
    """Owns every process it starts; `close()` stops them all (router, actors, Ray) exactly once."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.prefill: list = []
        self.decode: list = []
        self.router = None
        self.supervisor = None
        self._spawners: dict[str, Callable[[str, EngineConfig], Any]] = {}
        self._engines: dict[str, EngineConfig] = {}  # each role's engine config, before pinning
        self._next_index = {"prefill": 0, "decode": 0}  # ids are never reused, so metrics stay apart
        # --cpu-affinity auto: worker k (in spawn order, either role) gets _affinity[k % len]; workers that
        # `pdserve scale` adds later share the slots of the first ones.
        self._affinity: tuple[tuple[int, ...], ...] = ()
        self._spawned = 0
        self._started_ray = False
        self._closed = False

    def start_workers(self) -> None:
        use_token_auth_if_available(self.config.ray_address)  # before Ray is imported
        import ray

        from decode_worker.actor import DecodeWorkerActor
        from prefill_worker.actor import PrefillWorkerActor

        cfg = self.config
        engine_cfg = cfg.engine
        if engine_cfg.device == "cpu" and engine_cfg.num_threads == 0 and cfg.ray_address is None:
            # Workers (each of their TP ranks) share this machine's cores: oversubscribed torch pools thrash
            # (KV copies slow 10x).
            ranks = cfg.num_prefill * cfg.prefill_tp + cfg.num_decode * cfg.decode_tp
            engine_cfg = dataclasses.replace(engine_cfg, num_threads=max(1, (os.cpu_count() or 1) // ranks))
        # Prefill workers draft nothing: they run the draft head only to ship its features with the KV.
        prefill_spec = engine_cfg.spec if engine_cfg.spec.method == "head" else SpecConfig()
        role_engine = {"prefill": dataclasses.replace(engine_cfg, tp_size=cfg.prefill_tp, spec=prefill_spec),
                       "decode": dataclasses.replace(engine_cfg, tp_size=cfg.decode_tp)}
        _status(f"[1/4] starting Ray ({'local' if cfg.ray_address is None else cfg.ray_address})")
        if not ray.is_initialized():
            self._started_ray = init_ray(cfg.ray_address, os.cpu_count(), 256 * 1024 * 1024)
        # num_cpus=0: the engine threads do the work; Ray's CPU accounting would starve a 2-core box.
        # On CUDA each worker owns one GPU per TP rank (its follower ranks run in processes it spawns, on
        # the GPUs Ray gave the actor). On a multi-node cluster the decode side's KV channel listens on its
        # node's address ("auto"); locally on loopback.
        # max_restarts: a killed worker process comes back behind the same handle (docs/architecture.md).
        def placement(role: str) -> dict[str, Any]:
            gpus = role_engine[role].tp_size if cfg.engine.device == "cuda" else 0
            return {"num_cpus": 0, "num_gpus": gpus, "max_concurrency": 1000,
                    "max_restarts": cfg.max_worker_restarts, "resources": cfg.role_resources(role)}

        channel_host = "127.0.0.1" if cfg.ray_address is None else "auto"
        decode_cls = ray.remote(**placement("decode"))(DecodeWorkerActor)
        prefill_cls = ray.remote(**placement("prefill"))(PrefillWorkerActor)
        self._engines = role_engine
        self._spawners = {
            "decode": lambda wid, engine: decode_cls.options(name=f"pdserve-{wid}").remote(
                wid, engine, channel_host=channel_host, kv_failure_policy=cfg.router.kv_failure_policy),
            "prefill": lambda wid, engine: prefill_cls.options(name=f"pdserve-{wid}").remote(wid, engine),
        }
        if cfg.cpu_affinity:
            self._affinity = plan_affinity(allowed_cores(), cfg.num_decode + cfg.num_prefill)
        self.decode = [self._spawn("decode") for _ in range(cfg.num_decode)]
        self.prefill = [self._spawn("prefill") for _ in range(cfg.num_prefill)]
        _status(f"[2/4] loading {cfg.engine.model_path or 'the embedded SmolLM2-135M-Instruct'} into "
                f"{cfg.num_prefill} prefill + {cfg.num_decode} decode workers")
        _wait_with_progress([h.info.remote() for _, h in self.decode + self.prefill], "workers")
        _status("[3/4] connecting KV channels (one torch.distributed group per prefill/decode pair)")
        refs = []
        for _decode_id, d in self.decode:
            address = ray.get(d.channel_address.remote())
            for prefill_id, p in self.prefill:
                refs += [d.accept_channel.remote(prefill_id), p.connect_channel.remote(address)]
        _wait_with_progress(refs, "channel ends")

    def _spawn(self, role: str) -> tuple[str, Any]:
        wid = f"{role}-{self._next_index[role]}"
        self._next_index[role] += 1
        engine = self._engines[role]
        if self._affinity:
            cores = self._affinity[self._spawned % len(self._affinity)]
            engine = dataclasses.replace(engine, cpu_affinity=cores, num_threads=len(cores))
            _status(f"  {wid}: pinned to core{'s' if len(cores) > 1 else ''} {','.join(map(str, cores))}, "
                    f"{len(cores)} torch thread{'s' if len(cores) > 1 else ''}")
        self._spawned += 1
        return wid, self._spawners[role](wid, engine)

    async def serve(self) -> None:
        """Runs the router until SIGINT/SIGTERM, then shuts everything down."""
        import ray

        from engine.model_files import resolve_model_path
        from engine.tokenizer import Tokenizer
        from router.ray_clients import RayDecodeClient, RayPrefillClient
        from router.server import build_server

        cfg = self.config
        model_info = served_model_info(ray.get(self.decode[0][1].model_info.remote()), cfg.engine)
        model_path = resolve_model_path(cfg.engine.model_path)
        router_cfg = dataclasses.replace(
            cfg.router, max_model_len=model_info.context_length,
            served_model_name=cfg.router.served_model_name or served_model_name(model_path))
        tokenizer = Tokenizer.from_model(model_path)
        decode_clients = [RayDecodeClient(wid, h) for wid, h in self.decode]
        prefill_clients = [RayPrefillClient(wid, h) for wid, h in self.prefill]
        self.router = build_server(router_cfg, prefill_clients, decode_clients, tokenizer,
                                   model_info)
        await self.router.start()  # also serves /metrics and the HTTP door on their ports
        from deploy.supervisor import Supervisor

        self.supervisor = Supervisor(self.prefill, self.decode,
                                     on_restart=self.router.metrics.worker_restarted)
        supervising = asyncio.create_task(self.supervisor.run(), name="supervisor")
        from deploy.scaling import Scaler, start_admin

        scaler = Scaler(self._spawn, {"prefill": self.prefill, "decode": self.decode}, self.router.pool,
                        self.router.metrics.worker_source, drain_timeout_s=router_cfg.request_timeout_s)
        admin = await start_admin(scaler, cfg.admin_port)
        admin_address = f"127.0.0.1:{admin.sockets[0].getsockname()[1]}"
        address = f"{router_cfg.host}:{self.router.port}"
        metrics_url = f"http://{router_cfg.metrics_host}:{self.router.metrics_port}/metrics"
        http_port = self.router.http_port
        scheme = "https" if router_cfg.tls_cert_file else "http"
        http_url = f"{scheme}://{router_cfg.host}:{http_port}/v1" if http_port is not None else None
        _status(f"[4/4] router listening on {address}, metrics on {metrics_url}")
        if http_url:
            _status(f"OpenAI-compatible API on {http_url}")
        if cfg.ready_file:
            Path(cfg.ready_file).write_text(json.dumps({
                "address": address, "metrics_url": metrics_url, "http_url": http_url,
                "admin_address": admin_address}))
        tls = f" --tls-ca {router_cfg.tls_cert_file}" if router_cfg.tls_cert_file else ""
        auth = f" --auth-token-file {router_cfg.auth_token_file}" if router_cfg.auth_token_file else ""
        curl = (f" --cacert {router_cfg.tls_cert_file}" if tls else "") + (
            f" -H \"Authorization: Bearer $(cat {router_cfg.auth_token_file})\"" if auth else "")
        try_http = (f"  curl -s{curl} {http_url}/models\n" if http_url else "")
        _status("\nReady. Try:\n"
                f"  .venv/bin/pdserve generate \"What is the capital of France?\" --address {address}"
                f"{tls}{auth}\n"
                f"  grpcurl {f'-cacert {router_cfg.tls_cert_file}' if tls else '-plaintext'} {address} list\n"
                f"{try_http}"
                f"  .venv/bin/pdserve scale --prefill 1 --decode 2 --admin {admin_address}\n"
                "Ctrl-C stops the cluster.")
        await self._wait_for_signal()
        admin.close()  # no scaling while the cluster drains
        running = len(self.router.active)
        _status(f"\nshutting down: {running} running request(s) get up to {cfg.drain_seconds:g} s to finish "
                "(Ctrl-C again to stop now)")
        drain = asyncio.create_task(self.router.stop(grace=cfg.drain_seconds))
        again = asyncio.create_task(self._wait_for_signal())
        await asyncio.wait((drain, again), return_when=asyncio.FIRST_COMPLETED)
        again.cancel()
        if not drain.done():
            drain.cancel()
            await asyncio.gather(drain, return_exceptions=True)
            _status("stopping now: the remaining requests are aborted")
            await self.router.stop(grace=None)
        supervising.cancel()
        await asyncio.gather(supervising, return_exceptions=True)
        await self.supervisor.close()

    @staticmethod
    async def _wait_for_signal() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()

    def close(self) -> None:
        """Stops every worker and Ray. A Ctrl-C meanwhile skips the polite shutdown calls still to come but
        never the kills (it raised KeyboardInterrupt in ray.kill: a traceback, workers left to Ray's exit)."""
        if self._closed:
            return
        self._closed = True
        try:
            import ray
        except ImportError:
            return
        if not ray.is_initialized():
            return
        with _sigint_deferred() as hurry:
            for _, handle in self.prefill + self.decode:
                if not hurry.is_set():
                    try:
                        ray.get(handle.shutdown.remote(), timeout=10)
                    except Exception:  # a dead actor is already stopped
                        pass
                ray.kill(handle)
            if self._started_ray:
                ray.shutdown()
        _status("stopped: workers killed, Ray shut down, ports freed")


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[threading.Event]:
    """While it is open, SIGINT sets the event instead of raising KeyboardInterrupt (main thread only)."""
    pressed = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield pressed
        return
    previous = signal.signal(signal.SIGINT, lambda *_: pressed.set())
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, previous)
