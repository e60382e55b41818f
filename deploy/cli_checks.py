"""Checks `pdserve up` runs before anything starts: each failure names the flag to fix."""
from __future__ import annotations

import argparse
import errno
import socket


class UsageError(Exception):
    """Bad flag value: the message names the flag and the fix."""


def check_port_free(host: str, port: int, flag: str) -> None:
    """Fails early with the flag to change if something listens on the port. SO_REUSEADDR, as the servers
    themselves bind: connections of a just-stopped cluster in TIME_WAIT (a scraped /metrics) hold the port
    for a minute, but nothing listens there, and a restart must work."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UsageError(f"port {port} on {host} is already in use: stop what holds it or pick "
                                 f"another with {flag}") from None
            raise UsageError(f"cannot bind {host}:{port} ({e.strerror}): fix {flag}") from None


def check_host(host: str, flag: str) -> None:
    """The address must be one this machine can bind (an unknown name, another host's IP), checked before Ray
    starts; with port 0 check_port_free never looks at it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, 0))
        except OSError as e:
            raise UsageError(f"cannot bind {host!r} ({e.strerror or e}): fix {flag}") from None


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def default_device() -> str:
    return "cuda" if _cuda_available() else "cpu"


def check_device(device: str, kernels: str, ray_address: str | None) -> None:
    """--device against this machine: on a private Ray, CUDA workers on a machine without a GPU would wait
    for one forever; Triton kernels run on CUDA only."""
    if device == "cuda" and ray_address is None and not _cuda_available():
        raise UsageError("--device cuda: this machine has no CUDA device; use --device cpu, or --ray-address "
                         "to join a Ray cluster whose nodes have GPUs")
    if kernels == "triton" and device != "cuda":
        raise UsageError(f"--kernels triton needs --device cuda (got --device {device})")


def check_tp_flags(args: argparse.Namespace) -> None:
    """Each TP size must be <= the model's attention heads (heads and kv heads are split in balanced, possibly
    uneven shares: engine/tp/heads.py); checked from the model's config before any worker starts."""
    from engine.model_files import read_model_config

    if args.prefill_tp == 1 and args.decode_tp == 1:
        return
    config = read_model_config(args.model)
    for flag, size in (("--prefill-tp", args.prefill_tp), ("--decode-tp", args.decode_tp)):
        if size > config.num_heads:
            raise UsageError(f"{flag} {size}: the model has {config.num_heads} attention heads "
                             f"({config.num_kv_heads} kv heads); a TP size must not exceed the heads")


def check_security_files(args: argparse.Namespace) -> None:
    """Before Ray starts: a TLS pair given whole and readable, a readable non-empty token file."""
    from router.security import BearerAuth, SecurityConfigError, TlsFiles

    if (args.tls_cert is None) != (args.tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together: give both or neither")
    try:
        if args.tls_cert:
            TlsFiles(args.tls_cert, args.tls_key).grpc_credentials()
        if args.auth_token_file:
            BearerAuth.from_file(args.auth_token_file)
    except SecurityConfigError as e:
        raise UsageError(str(e)) from None
