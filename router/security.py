"""Public-port security: the bearer token clients must present and the TLS key pair both doors serve."""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc

AUTH_HEADER = "authorization"


class SecurityConfigError(ValueError):
    """A token or certificate file is missing, empty or unreadable; the message names the file."""


def read_secret_file(path: str | Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise SecurityConfigError(f"cannot read the {what} file {str(path)!r}: {e.strerror}") from None
    if not data.strip():
        raise SecurityConfigError(f"the {what} file {str(path)!r} is empty")
    return data


class BearerAuth:
    """Checks `authorization: Bearer <token>` (gRPC metadata or HTTP header) against one shared token."""

    def __init__(self, token: str) -> None:
        if not token or any(c.isspace() for c in token):
            raise SecurityConfigError("the auth token must be non-empty and contain no whitespace")
        self._token = token.encode()

    @classmethod
    def from_file(cls, path: str | Path) -> BearerAuth:
        # One line, like an API key file; a trailing newline from `echo` is not part of the token.
        return cls(read_secret_file(path, "auth token").decode(errors="replace").strip())

    def check_header(self, value: str | None) -> str | None:
        """None if `value` (the authorization header) carries the token, else why not (safe to show)."""
        if not value:
            return "missing credentials: send the header 'authorization: Bearer <token>'"
        scheme, _, given = value.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return "malformed credentials: the authorization header must be 'Bearer <token>'"
        # Constant time: the comparison must not tell an attacker how much of a guess was right.
        if not hmac.compare_digest(given.strip().encode(), self._token):
            return "invalid credentials: the bearer token is not the one this server accepts"
        return None

    def check(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
        for key, value in metadata or ():
            if key == AUTH_HEADER:
                return self.check_header(value if isinstance(value, str) else value.decode(errors="replace"))
        return self.check_header(None)


@dataclass(frozen=True)
class TlsFiles:
    """The PEM certificate chain and private key both public doors (gRPC and HTTP) serve."""

    cert_file: str
    key_file: str

    def grpc_credentials(self) -> grpc.ServerCredentials:
        cert = read_secret_file(self.cert_file, "TLS certificate")
        key = read_secret_file(self.key_file, "TLS key")
        return grpc.ssl_server_credentials([(key, cert)])
