"""`pdserve up`: its flags, the engine and router configs they build, and the command that starts it."""
from __future__ import annotations

import argparse
import asyncio
import os
import sys

from contracts.transfer import KV_FAILURE_POLICIES
from deploy.affinity import CPU_AFFINITY_MODES, AffinityError, check_affinity_flags
from deploy.cli_args import (
    http_port,
    non_empty,
    non_negative,
    port,
    positive,
    resources,
    seconds,
    slowdown,
    spec_k,
    spec_tree,
    whole_number,
)
from deploy.cli_checks import (
    UsageError,
    check_device,
    check_host,
    check_port_free,
    check_security_files,
    check_tp_flags,
    default_device,
)
from engine.config import KERNEL_BACKENDS, TP_COMMS, WEIGHT_SCHEMES, EngineConfig
from engine.spec.config import SPEC_METHODS, SpecConfig
from router.config import RouterConfig
from router.dispatch import known_policies
from router.placement import known_placements

# `pdserve up` (and so `make serve`) does not speculate unless told to: on the embedded model on a 2-core CPU
# both drafters gain ~1.1x at batch 1 and lose at batch 8 (0.72-0.91x): a serving default must not slow a
# loaded worker (docs/speculative.md).
DEFAULT_SPEC = "off"

# A request's life bound under `pdserve up` (RouterConfig.request_timeout_s; a client deadline only shortens
# it), and how long `pdserve scale` waits for a removed worker's requests to drain.
UP_REQUEST_TIMEOUT_S = 600.0

# --kv-cache value -> EngineConfig.kv_cache_dtype
KV_CACHE_FLAG = {"auto": "auto", "bf16": "bfloat16", "int8": "int8", "int4": "int4"}


def add_up_flags(up: argparse.ArgumentParser) -> None:
    """Every `pdserve up` flag, each value checked by its type (deploy/cli_args) as argparse reads it."""
    up.add_argument("--model", default=None, help="GGUF file or HF safetensors dir (default: the embedded "
                                                  "SmolLM2-135M-Instruct)")
    up.add_argument("--prefill", type=positive("--prefill"), default=1, help="prefill workers")
    up.add_argument("--decode", type=positive("--decode"), default=1, help="decode workers")
    up.add_argument("--host", default="127.0.0.1",
                    help="address the public ports (gRPC, HTTP) bind; 0.0.0.0 = every interface")
    up.add_argument("--port", type=port("--port"), default=50051, help="gRPC port (0 = any free port)")
    up.add_argument("--metrics-port", type=port("--metrics-port"), default=9400,
                    help="Prometheus /metrics port (0 = any free port)")
    up.add_argument("--metrics-host", default="127.0.0.1",
                    help="address /metrics binds (unauthenticated: keep it off public interfaces)")
    up.add_argument("--http-port", type=http_port, default=8000,
                    help="OpenAI-compatible HTTP API port (0 = off; auto = any free port)")
    up.add_argument("--served-model-name", type=non_empty("--served-model-name"), default=None,
                    help="model name clients see (HTTP model id, `pdserve info`; default: the model file's "
                         "name, e.g. SmolLM2-135M-Instruct)")
    up.add_argument("--max-batch-tokens", type=positive("--max-batch-tokens"), default=512,
                    help="token budget per engine step")
    up.add_argument("--kv-blocks", type=positive("--kv-blocks"), default=512,
                    help="KV cache blocks per worker (16 tokens each)")
    up.add_argument("--kv-cache", choices=tuple(KV_CACHE_FLAG), default="auto",
                    help="KV cache dtype: auto = the compute dtype; int8 / int4 keep scales and move between "
                         "workers as stored")
    up.add_argument("--prefix-caching", choices=("on", "off"), default="on",
                    help="reuse the KV of prompt blocks a worker computed before (and send only the "
                         "missing suffix to a decode worker that holds the prefix)")
    up.add_argument("--long-prefill-threshold", type=non_negative("--long-prefill-threshold"), default=128,
                    help="while others run or wait, a prompt with more tokens left than this computes at "
                         "most this many per step (0 = off: one prompt may take the whole budget)")
    up.add_argument("--fused-max-slowdown", type=slowdown, default=1.35,
                    help="with decodes running, prefill beside them is paid from a time credit so the "
                         "decode batch's steps average at most this many times a decode-only step, by step "
                         "costs timed online (0 = off)")
    up.add_argument("--device", choices=("cpu", "cuda"), default=None,
                    help="where the workers run (default: cuda if available, else cpu)")
    up.add_argument("--kernels", choices=KERNEL_BACKENDS, default="auto",
                    help="auto: Triton on CUDA, torch references elsewhere; torch: references everywhere")
    up.add_argument("--weights", choices=WEIGHT_SCHEMES, default="auto",
                    help="auto: the file's weights in the compute dtype; bf16: the same in bfloat16 (also "
                         "on CPU); w8: int8 weights, activations in the compute dtype; w8a8: int8 weights "
                         "and activations; w4a16: int4 weights (GGUF Q4_1 as is)")
    up.add_argument("--prefill-tp", type=positive("--prefill-tp"), default=1,
                    help="tensor-parallel ranks per prefill worker (one process each; at most the model's "
                         "attention heads)")
    up.add_argument("--decode-tp", type=positive("--decode-tp"), default=1,
                    help="tensor-parallel ranks per decode worker (may differ from --prefill-tp)")
    up.add_argument("--tp-comm", choices=TP_COMMS, default="bf16",
                    help="how tensor-parallel ranks all-reduce: bf16 = unquantized in the compute dtype; "
                         "int8 = 8-bit blocks with scales (about half the bytes)")
    up.add_argument("--spec", choices=SPEC_METHODS, default=DEFAULT_SPEC,
                    help="speculative decoding on the decode workers: ngram = prompt lookup; head = the "
                         "learned draft head (--spec-head); off = one token per step. Default off: on the "
                         "embedded model both drafters lose once several streams decode (docs/speculative)")
    up.add_argument("--spec-k", type=spec_k, default=5, help="most draft tokens per verify step (1..16)")
    up.add_argument("--spec-head", default=None,
                    help="draft head safetensors for --spec head (default: the head shipped for the "
                         "embedded model)")
    up.add_argument("--spec-adaptive", choices=("on", "off"), default="on",
                    help="each request drafts 0..k tokens a step (0: plain), following its acceptance "
                         "and the measured step costs")
    up.add_argument("--spec-tree", type=spec_tree, default=None,
                    help="--spec head drafts trees, not chains: the head's top-b tokens after each node, b "
                         "per depth, e.g. 2,2,1,1,1 (the depth replaces --spec-k); default chains")
    up.add_argument("--spec-tree-max-nodes", type=positive("--spec-tree-max-nodes"), default=None,
                    help="keep only this many tree nodes, those of highest path probability")
    up.add_argument("--dispatch-policy", default="least_loaded", choices=known_policies(),
                    help="how the router picks workers")
    up.add_argument("--queue-capacity", type=positive("--queue-capacity"), default=256,
                    help="requests that may wait for a worker; beyond it RESOURCE_EXHAUSTED")
    up.add_argument("--drain-seconds", type=seconds("--drain-seconds"), default=10.0,
                    help="on Ctrl-C/SIGTERM, how long running streams get to finish before they are aborted")
    up.add_argument("--max-request-bytes", type=positive("--max-request-bytes"), default=4 * 1024 * 1024,
                    help="largest request accepted (gRPC message or HTTP body); larger ones get "
                         "RESOURCE_EXHAUSTED or 413")
    up.add_argument("--tls-cert", default=None,
                    help="PEM certificate chain: serve gRPC and the HTTP API over TLS (needs --tls-key)")
    up.add_argument("--tls-key", default=None, help="PEM private key for --tls-cert")
    up.add_argument("--auth-token-file", default=None,
                    help="file with one bearer token; gRPC and HTTP API calls must then send "
                         "'authorization: Bearer <token>' (health and /metrics stay open)")
    up.add_argument("--admin-port", type=port("--admin-port"), default=50052,
                    help="loopback port for `pdserve scale` (0 = any free port)")
    up.add_argument("--ready-file", default=None,
                    help="once serving, write the bound addresses here as JSON (useful with --port 0)")
    up.add_argument("--ray-address", default=None,
                    help="join an existing Ray cluster (e.g. 'auto' on a Ray node); "
                         "default: start a private one")
    up.add_argument("--prefill-resources", type=resources("--prefill-resources"), default=None,
                    help="custom Ray resources prefill actors ask for, NAME=AMOUNT[,...] ('none' = place "
                         "anywhere); default pdserve_prefill=1 with --ray-address, none otherwise")
    up.add_argument("--decode-resources", type=resources("--decode-resources"), default=None,
                    help="custom Ray resources decode actors ask for, NAME=AMOUNT[,...] ('none' = place "
                         "anywhere); default pdserve_decode=1 with --ray-address, none otherwise")
    up.add_argument("--prefill-placement", choices=known_placements(), default="cost",
                    help="where prompts are prefilled: cost = per request from measured costs (prefill "
                         "s/token, transfer, pool queue, decode load); threshold: --local-prefill-max-tokens")
    up.add_argument("--local-prefill-max-tokens", type=non_negative("--local-prefill-max-tokens"), default=0,
                    help="with --prefill-placement threshold: prompts up to this many tokens are "
                         "prefilled on the decode worker (0 = never)")
    up.add_argument("--placement-ttft-slo", type=seconds("--placement-ttft-slo", allow_zero=False),
                    default=None, metavar="SECONDS",
                    help="with --prefill-placement cost: a prompt is not prefilled on its decode worker when "
                         "its steps would hold another request's KV transfer in flight past this first-token "
                         "objective (default: none, only the total delay is weighed)")
    up.add_argument("--migration-limit", type=non_negative("--migration-limit"), default=1,
                    help="times a request moves off a dead decode worker, re-prefilled from prompt + "
                         "tokens streamed so far (default 1; 0 = it fails)")
    up.add_argument("--kv-failure-policy", choices=KV_FAILURE_POLICIES, default="recompute",
                    help="a failed or expired KV transfer, or a dead prefill worker: recompute the prompt on "
                         "the decode worker, or fail the request (default recompute)")
    up.add_argument("--cpu-affinity", choices=CPU_AFFINITY_MODES, default="off",
                    help="auto: pin each worker process to its own cores of those this process may use "
                         "(round-robin when workers outnumber cores; decode workers first), torch threads = "
                         "its cores; CPU workers, TP 1, local Ray only. off: the OS places them")
    up.add_argument("--max-worker-restarts", type=whole_number("--max-worker-restarts", -1), default=-1,
                    help="Ray restarts a dead worker process up to this many times (default -1 = always)")


def spec_config(args: argparse.Namespace) -> SpecConfig:
    if args.spec_head is not None:
        if args.spec != "head":
            raise UsageError(f"--spec-head is for --spec head (got --spec {args.spec})")
        if not os.path.isfile(args.spec_head):
            raise UsageError(f"--spec-head: no such file: {args.spec_head}")
    if args.spec_tree is not None and args.spec != "head":
        raise UsageError(f"--spec-tree is for --spec head (got --spec {args.spec})")
    if args.spec_tree_max_nodes is not None and args.spec_tree is None:
        raise UsageError("--spec-tree-max-nodes needs --spec-tree")
    return SpecConfig(args.spec, k=args.spec_k, head_path=args.spec_head, adaptive=args.spec_adaptive == "on",
                      tree_branching=args.spec_tree or (), tree_max_nodes=args.spec_tree_max_nodes)


def _configs(args: argparse.Namespace, device: str, spec: SpecConfig) -> tuple[EngineConfig, RouterConfig]:
    engine = EngineConfig(model_path=args.model, device=device, tp_comm=args.tp_comm,
                          dtype="float32" if device == "cpu" and args.weights != "bf16" else "bfloat16",
                          weights=args.weights,
                          kv_cache_dtype=KV_CACHE_FLAG[args.kv_cache], num_kv_blocks=args.kv_blocks,
                          max_batch_tokens=args.max_batch_tokens, kernels=args.kernels,
                          prefix_caching=args.prefix_caching == "on",
                          long_prefill_token_threshold=args.long_prefill_threshold,
                          fused_step_max_slowdown=args.fused_max_slowdown, spec=spec)
    router = RouterConfig(host=args.host, port=args.port, metrics_port=args.metrics_port,
                          metrics_host=args.metrics_host, http_port=args.http_port,
                          served_model_name=args.served_model_name, dispatch_policy=args.dispatch_policy,
                          queue_capacity=args.queue_capacity, request_timeout_s=UP_REQUEST_TIMEOUT_S,
                          prefill_placement=args.prefill_placement,
                          local_prefill_max_tokens=args.local_prefill_max_tokens,
                          placement_ttft_slo_s=args.placement_ttft_slo,
                          migration_limit=args.migration_limit, kv_failure_policy=args.kv_failure_policy,
                          tls_cert_file=args.tls_cert, tls_key_file=args.tls_key,
                          auth_token_file=args.auth_token_file, max_request_bytes=args.max_request_bytes)
    return engine, router


def cmd_up(args: argparse.Namespace) -> int:
    from engine.model_files import ModelPathError, resolve_model_path

    try:
        resolve_model_path(args.model)
    except ModelPathError as e:
        raise UsageError(f"--model: {e}") from None
    check_tp_flags(args)
    device = args.device or default_device()
    if args.cpu_affinity == "auto":
        try:
            check_affinity_flags(device, args.prefill_tp, args.decode_tp, args.ray_address)
        except AffinityError as e:
            raise UsageError(str(e)) from None
    check_device(device, args.kernels, args.ray_address)
    check_security_files(args)
    check_host(args.host, "--host")
    check_host(args.metrics_host, "--metrics-host")
    spec = spec_config(args)
    if args.placement_ttft_slo is not None and args.prefill_placement != "cost":
        raise UsageError(f"--placement-ttft-slo is for --prefill-placement cost "
                         f"(got --prefill-placement {args.prefill_placement})")
    ports = ((args.port, "--port"), (args.metrics_port, "--metrics-port"), (args.http_port, "--http-port"),
             (args.admin_port, "--admin-port"))
    for number, flag in ports:
        if number:  # 0: the OS picks a free port when the server binds (see --ready-file); None: off
            check_port_free(args.host, number, flag)
    fixed = [(number, flag) for number, flag in ports if number]
    for i, (number, flag) in enumerate(fixed):
        for other, other_flag in fixed[i + 1:]:
            if number == other:
                raise UsageError(f"{flag} and {other_flag} must differ")
    from deploy.launcher import ClusterConfig, LocalCluster

    try:  # the flags' types check each value; a combination the configs refuse is a usage error too
        engine, router = _configs(args, device, spec)
    except ValueError as e:
        raise UsageError(str(e)) from None
    cluster = LocalCluster(ClusterConfig(engine=engine, router=router, num_prefill=args.prefill,
                                         num_decode=args.decode, prefill_tp=args.prefill_tp,
                                         decode_tp=args.decode_tp,
                                         max_worker_restarts=args.max_worker_restarts,
                                         ray_address=args.ray_address, ready_file=args.ready_file,
                                         admin_port=args.admin_port,
                                         prefill_resources=args.prefill_resources,
                                         decode_resources=args.decode_resources,
                                         drain_seconds=args.drain_seconds,
                                         cpu_affinity=args.cpu_affinity == "auto"))
    try:
        cluster.start_workers()
        asyncio.run(cluster.serve())
    except KeyboardInterrupt:
        pass
    except Exception as e:  # one clear line for the user; the traceback only on request
        if os.environ.get("PDSERVE_DEBUG"):
            raise
        print(f"pdserve up: error: {_one_line(e)} (set PDSERVE_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    finally:
        cluster.close()
    return 0


def _one_line(e: BaseException) -> str:
    """Ray wraps worker errors in multi-line reports: keep the original exception's own message."""
    cause = getattr(e, "cause", None) or e
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"
