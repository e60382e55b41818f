"""Refuses benchmark targets that are not this machine: a load generator must not hit someone else."""
from __future__ import annotations

import ipaddress


class NonLoopbackTarget(ValueError):
    """The address is not 127.0.0.0/8, ::1 or localhost."""


def check_loopback(address: str) -> None:
    """address is host:port ([::1]:port for IPv6); raises NonLoopbackTarget for anything off this machine."""
    host = address.rsplit(":", 1)[0] if ":" in address else address
    host = host.strip("[]")
    if host.lower() == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise NonLoopbackTarget(f"refusing to load {address!r}: pdserve bench only targets this machine "
                            f"(127.0.0.0/8, [::1] or localhost)")
