"""`pdserve` command line: up (start a local cluster), generate (stream a completion), info."""
from __future__ import annotations

import argparse
import asyncio
import errno
import os
import socket
import sys

from engine.config import WEIGHT_SCHEMES
from router.dispatch import known_policies


class UsageError(Exception):
    """Bad flag value: the message names the flag and the fix."""


def _positive(flag: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} wants a whole number, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be >= 1, got {value}")
        return value
    return parse


def _port(flag: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} wants a port number, got {text!r}") from None
        if not 0 <= value < 65536:
            raise argparse.ArgumentTypeError(f"{flag} must be in 0..65535 (0 = any free port), got {value}")
        return value
    return parse


def _default_device() -> str:
    try:
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def _check_port_free(host: str, port: int, flag: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UsageError(f"port {port} on {host} is already in use: stop what holds it or pick "
                                 f"another with {flag}") from None
            raise UsageError(f"cannot bind {host}:{port} ({e.strerror}): fix {flag}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated prefill/decode LLM serving.")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start router + prefill + decode workers on this machine")
    up.add_argument("--model", default=None, help="GGUF file or HF safetensors dir (default: embedded "
                                                  "SmolLM2-135M-Instruct)")
    up.add_argument("--prefill", type=_positive("--prefill"), default=1, help="prefill workers (default 1)")
    up.add_argument("--decode", type=_positive("--decode"), default=1, help="decode workers (default 1)")
    up.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    up.add_argument("--port", type=_port("--port"), default=50051, help="gRPC port (default 50051)")
    up.add_argument("--metrics-port", type=_port("--metrics-port"), default=9400,
                    help="Prometheus port (9400)")
    up.add_argument("--max-batch-tokens", type=_positive("--max-batch-tokens"), default=512,
                    help="token budget per engine step (default 512)")
    up.add_argument("--kv-blocks", type=_positive("--kv-blocks"), default=512,
                    help="KV cache blocks per worker (default 512, 16 tokens each)")
    up.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    up.add_argument("--weights", choices=WEIGHT_SCHEMES, default="auto",
                    help="auto: the file's weights in the compute dtype; bf16: the same in bfloat16 (also "
                         "on CPU); w8a8: int8 weights and activations; w4a16: int4 weights (CPU; GGUF Q4_1 "
                         "as is)")
    up.add_argument("--dispatch-policy", default="least_loaded", choices=known_policies(),
                    help="how the router picks workers (default least_loaded)")
    up.add_argument("--queue-capacity", type=_positive("--queue-capacity"), default=256)
    up.add_argument("--ready-file", default=None,
                    help="once serving, write the bound addresses here as JSON (useful with --port 0)")
    up.add_argument("--ray-address", default=None,
                    help="join an existing Ray cluster (e.g. 'auto' on a Ray node); "
                         "default: start a private one")
    up.add_argument("--local-prefill-max-tokens", type=int, default=0,
                    help="prompts up to this many tokens are prefilled on the decode worker (0 = never)")

    gen = sub.add_parser("generate", help="stream a completion from a running cluster")
    gen.add_argument("prompt")
    gen.add_argument("--address", default="127.0.0.1:50051")
    gen.add_argument("--raw", action="store_true", help="send the prompt as raw text (no chat template)")
    gen.add_argument("--system", default=None, help="system message (chat mode)")
    gen.add_argument("--max-tokens", type=_positive("--max-tokens"), default=None)
    gen.add_argument("--temperature", type=float, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    gen.add_argument("--json", action="store_true", help="print only the final message as JSON")

    inf = sub.add_parser("info", help="model and worker status of a running cluster")
    inf.add_argument("--address", default="127.0.0.1:50051")
    inf.add_argument("--timeout", type=float, default=10.0)
    return parser


def _cmd_up(args: argparse.Namespace) -> int:
    from engine.config import EngineConfig
    from engine.model_files import ModelPathError, resolve_model_path

    try:
        resolve_model_path(args.model)
    except ModelPathError as e:
        raise UsageError(f"--model: {e}") from None
    for port, flag in ((args.port, "--port"), (args.metrics_port, "--metrics-port")):
        if port:  # 0: the OS picks a free port when the server binds (see --ready-file)
            _check_port_free(args.host, port, flag)
    if args.port and args.port == args.metrics_port:
        raise UsageError("--port and --metrics-port must differ")
    from deploy.launcher import ClusterConfig, LocalCluster

    device = args.device or _default_device()
    if args.weights == "w4a16" and device != "cpu":
        raise UsageError("--weights w4a16 runs on CPU only so far: add --device cpu")
    engine = EngineConfig(model_path=args.model, device=device,
                          dtype="float32" if device == "cpu" and args.weights != "bf16" else "bfloat16",
                          weights=args.weights, num_kv_blocks=args.kv_blocks,
                          max_batch_tokens=args.max_batch_tokens)
    cluster = LocalCluster(ClusterConfig(engine=engine, num_prefill=args.prefill, num_decode=args.decode,
                                         host=args.host, port=args.port, metrics_port=args.metrics_port,
                                         dispatch_policy=args.dispatch_policy,
                                         queue_capacity=args.queue_capacity,
                                         local_prefill_max_tokens=args.local_prefill_max_tokens,
                                         ray_address=args.ray_address, ready_file=args.ready_file))
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "up":
            return _cmd_up(args)
        from deploy import client
        if args.command == "generate":
            opts = client.GenerateOptions(prompt=args.prompt, chat=not args.raw, system=args.system,
                                          max_tokens=args.max_tokens, temperature=args.temperature,
                                          top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                                          stop=tuple(args.stop), ignore_eos=args.ignore_eos)
            return client.generate(args.address, opts, args.json, args.timeout)
        return client.info(args.address, args.timeout)
    except UsageError as e:
        print(f"pdserve {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
