"""Connects the launcher to Ray: a private instance, or an operator's cluster (token auth included)."""
from __future__ import annotations

import os
from pathlib import Path

_AUTH_MODE = "RAY_AUTH_MODE"


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
