"""Connects the launcher to Ray: a private instance, or an operator's cluster (token auth included)."""
from __future__ import annotations

import os
from pathlib import Path

_AUTH_MODE = "RAY_AUTH_MODE"
# Read by the raylet a private `ray.init` starts (it inherits this process's environment).
WORKER_NICENESS_ENV = "RAY_worker_niceness"


def ray_token_available() -> bool:
    """A token where Ray's own loader looks: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token
    (written by `ray start` / `ray get-auth-token --generate` on this machine)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(path).is_file() if path else (Path.home() / ".ray" / "auth_token").is_file()


def use_token_auth_if_available(address: str | None) -> None:
    """Call before Ray is imported (it reads the mode once). Ray enables token authentication (on by default
    for clusters `ray start` creates) only when it finds the cluster itself (`auto`); with an explicit
    address a driver sends no token and every call fails with InvalidAuthToken. So with an address and a
    token at hand, token mode is switched on for this process and its children, unless the operator chose
    a mode (RAY_AUTH_MODE) already."""
    if address not in (None, "auto") and _AUTH_MODE not in os.environ and ray_token_available():
        os.environ[_AUTH_MODE] = "token"


def init_ray(address: str | None, num_cpus: int | None, object_store_bytes: int) -> bool:
    """`ray.init` for the launcher; True if it started a private instance (which it must shut down)."""
    import ray

    if address is None:
        # Ray starts its worker processes at nice 15 (meant for background tasks), and pdserve's workers are
        # the cluster's compute: on a machine shared with other jobs a nice-15 decode worker gets a small
        # fraction of a core against any nice-0 process (CFS weights 36 vs 1024), while the engine run
        # alone, or the router, competes at 0 (docs/benchmarks.md, issue 14's batching goal). An operator's
        # own RAY_worker_niceness wins; a joined cluster's raylets were started with their own setting.
        os.environ.setdefault(WORKER_NICENESS_ENV, "0")
        ray.init(include_dashboard=False, log_to_driver=False, num_cpus=num_cpus,
                 object_store_memory=object_store_bytes)
        return True
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    except ConnectionError as e:
        raise ConnectionError(
            f"cannot join the Ray cluster at {address} ({e}). If it uses token authentication (Ray's "
            "default), give this process its token: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, or "
            "~/.ray/auth_token (`ray get-auth-token` on the head node prints it)") from e
    return False
