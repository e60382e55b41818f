"""Typed errors of the KV transfer path (layout mismatches live in layout.py as KVLayoutMismatch)."""

from __future__ import annotations


class KVTransferError(RuntimeError):
    """Base of every transport/protocol failure raised by kv_transfer."""


class ChannelError(KVTransferError):
    """The channel failed (peer gone, transport error, size mismatch between send and recv)."""


class ChannelClosed(ChannelError):
    """The channel was closed (by this side or the peer) before the operation completed."""


class ChannelTimeout(KVTransferError, TimeoutError):
    """A handshake or a wait on a transfer handle ran past its deadline."""


class FrameError(KVTransferError):
    """Bytes on the wire are not a valid frame (bad magic/version/header check): the stream is desynced."""
