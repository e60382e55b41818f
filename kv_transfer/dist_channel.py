"""KVChannel over a per-P/D-pair torch.distributed group (gloo on CPU, NCCL on CUDA) built from a TCPStore the
decode side hosts; the handshake exchanges KVLayouts and fails loudly on both sides if they differ."""

from __future__ import annotations

import datetime
import logging
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from kv_transfer.channel import KVChannel, TransferHandle, check_contiguous
from kv_transfer.errors import ChannelClosed, ChannelError, ChannelTimeout
from kv_transfer.layout import KVLayout, KVLayoutMismatch

log = logging.getLogger(__name__)

DECODE_RANK, PREFILL_RANK = 0, 1
_TAG = 0  # one tag: gloo keeps messages of one (peer, tag) in order, which is what makes the channel ordered
# Op timeout of the group. An idle channel keeps a header recv posted for as long as it lives, and a gloo
# timeout breaks the whole group, so it is long; dead peers raise connection errors, stuck ones hit leases.
_OP_TIMEOUT = datetime.timedelta(days=7)
_WARMUP_VALUE = 0x4B56  # first message: proves the group moves bytes (and builds NCCL's communicator)
_OK = b"ok"


def _is_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def _local_address_towards(host: str, port: int) -> str:
    """This machine's address on the route to host:port (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, port))
            return s.getsockname()[0]
        except OSError:
            return ""


def _build_group(store: dist.Store, rank: int, device: torch.device, bind_host: str) -> Any:
    if _is_cuda(device):
        nccl_opts = dist.ProcessGroupNCCL.Options()
        nccl_opts._timeout = _OP_TIMEOUT
        return dist.ProcessGroupNCCL(store, rank, 2, nccl_opts)
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = _OP_TIMEOUT
    opts._threads = 1  # send/recv do not use gloo's worker threads; keep the thread count low
    opts._devices = [
        dist.ProcessGroupGloo.create_device(hostname=bind_host)
        if bind_host
        else dist.ProcessGroupGloo.create_default_device()
    ]
    return dist.ProcessGroupGloo(store, rank, 2, opts)


class _Completer:
    """Waits on one direction's works in issue order and completes their handles (gloo's is_completed() only
    turns true once someone waited, so a thread does the waiting)."""

    def __init__(self, name: str, device: torch.device, on_done: Callable[[TransferHandle], None]) -> None:
        self._on_done = on_done
        self._queue: queue.Queue[tuple[Any, TransferHandle, torch.Tensor] | None] = queue.Queue()
        self._cuda = _is_cuda(device)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, work: Any, handle: TransferHandle, tensor: torch.Tensor) -> None:
        self._queue.put((work, handle, tensor))  # the tensor stays referenced until the op completed

    def stop(self) -> None:
        self._stopped.set()
        self._queue.put(None)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            work, handle, _tensor = item
            try:
                if self._cuda:
                    # NCCL's wait() on a pending op would make this thread's stream wait on it; poll instead
                    delay = 1e-5
                    while not work.is_completed():
                        if self._stopped.is_set():  # channel closed (communicator aborted): stop polling
                            raise ChannelClosed(f"{handle.description}: channel closed")
                        time.sleep(delay)
                        delay = min(delay * 2, 1e-3)
                work.wait()  # gloo: blocks until done; NCCL: already done, so this only surfaces an error
            except Exception as e:  # noqa: BLE001 -- any failure must complete the handle, not kill the thread
                handle._complete(ChannelError(f"{handle.description} failed: {e}"))
            else:
                handle._complete()
            self._on_done(handle)
            del item, work, _tensor


class DistKVChannel(KVChannel):
    """Two-rank process group (decode = rank 0, prefill = rank 1); one channel per P/D pair."""

    def __init__(
        self, group: Any, store: dist.Store, peer_rank: int, device: torch.device, name: str
    ) -> None:
        super().__init__()
        self._group: Any = group
        self._store = store  # the group's rendezvous store; kept alive as long as the group
        self._peer = peer_rank
        self._device = device
        self._name = name
        self._closed = False
        self._lock = threading.Lock()
        self._pending: set[TransferHandle] = set()
        self._senders = _Completer(f"kv-send-{name}", device, self._forget)
        self._receivers = _Completer(f"kv-recv-{name}", device, self._forget)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def closed(self) -> bool:
        return self._closed

    def send(self, t: torch.Tensor) -> TransferHandle:
        return self._issue("send", t)

    def recv(self, t: torch.Tensor) -> TransferHandle:
        return self._issue("recv", t)

    def _issue(self, op: str, t: torch.Tensor) -> TransferHandle:
        check_contiguous(t)
        if t.device != self._device:
            raise ValueError(f"tensor on {t.device}, channel on {self._device}")
        handle = TransferHandle(f"{op} of {t.numel() * t.element_size()} bytes on {self._name}")
        with self._lock:
            if self._closed:
                raise ChannelClosed(f"{op} on closed channel {self._name}")
            try:
                if op == "send":
                    work = self._group.send([t], self._peer, _TAG)
                else:
                    work = self._group.recv([t], self._peer, _TAG)
            except RuntimeError as e:  # e.g. gloo: connection closed by peer
                raise ChannelError(f"{op} on {self._name} failed: {e}") from e
            self._pending.add(handle)
        (self._senders if op == "send" else self._receivers).put(work, handle, t)
        return handle

    def _forget(self, handle: TransferHandle) -> None:
        with self._lock:
            self._pending.discard(handle)

    def close(self) -> None:
        """Fail pending handles, stop the completion threads, drop the group (gloo: the peer sees the sockets
        close; NCCL: the communicator is aborted so in-flight kernels end)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending, self._pending = self._pending, set()
            group, self._group = self._group, None
        for handle in pending:
            handle._complete(ChannelClosed(f"channel {self._name} closed"))
        self._senders.stop()
        self._receivers.stop()
        if _is_cuda(self._device):
            try:
                group.abort()
            except Exception as e:  # noqa: BLE001 -- closing must not raise; the group is gone either way
                log.info("abort of %s: %s", self._name, e)
        del group


def _timedelta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def _join_key(peer_id: str) -> str:
    return f"kv/{peer_id}/join"


def _wait(store: dist.Store, keys: list[str], timeout: float, what: str) -> None:
    try:
        store.wait(keys, _timedelta(timeout))
    except (RuntimeError, dist.DistError) as e:  # DistStoreError on timeout
        raise ChannelTimeout(f"{what}: not done within {timeout}s ({e})") from e


def _mismatch_message(peer_id: str, decode: KVLayout, prefill: KVLayout) -> str | None:
    try:
        decode.check_compatible(prefill, names=("decode", "prefill"))
    except KVLayoutMismatch as e:
        return f"channel decode<-{peer_id!r}: {e}"
    return None


def _open(
    store: dist.Store,
    prefix: str,
    rank: int,
    device: torch.device,
    bind_host: str,
    peer_id: str,
    timeout: float,
) -> DistKVChannel:
    group_store = dist.PrefixStore(f"{prefix}/pg", store)
    group = _build_group(group_store, rank, device, bind_host)
    channel = DistKVChannel(group, store, 1 - rank, device, f"{peer_id}->decode")
    probe = torch.full((1,), _WARMUP_VALUE if rank == PREFILL_RANK else 0, dtype=torch.int64, device=device)
    try:
        (channel.send(probe) if rank == PREFILL_RANK else channel.recv(probe)).wait(timeout)
        if rank == DECODE_RANK and int(probe.item()) != _WARMUP_VALUE:
            raise ChannelError(f"channel {peer_id!r}: warm-up message corrupted ({int(probe.item())})")
    except BaseException:
        channel.close()
        raise
    return channel


class ChannelListener:
    """Decode side: hosts the TCPStore prefill workers rendezvous on; `accept` builds one channel per peer."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, device: str = "cpu") -> None:
        self.host = host
        self.device = torch.device(device)
        # port 0 = the store binds a free port; wait_for_workers=False: peers come and go
        self._store: dist.TCPStore | None = dist.TCPStore(
            host, port, None, True, _timedelta(60), wait_for_workers=False
        )
        self._port = self._store.port

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self._port)

    def accept(self, peer_id: str, layout: KVLayout, timeout: float = 60.0) -> KVChannel:
        """Block until prefill worker `peer_id` joins; KVLayoutMismatch (here and there) if layouts differ."""
        store = self._store
        if store is None:
            raise ChannelClosed("listener is closed")
        join = _join_key(peer_id)
        _wait(store, [join], timeout, f"waiting for prefill worker {peer_id!r} to join")
        nonce = store.get(join).decode()
        store.delete_key(join)  # a reconnect of the same peer brings a fresh nonce (and a fresh key space)
        prefix = f"kv/{peer_id}/{nonce}"
        session = dist.PrefixStore(prefix, store)
        _wait(session, ["prefill_layout"], timeout, f"layout of prefill worker {peer_id!r}")
        peer_layout = KVLayout.from_bytes(session.get("prefill_layout"))
        message = _mismatch_message(peer_id, layout, peer_layout)
        session.set("decode_layout", layout.to_bytes())
        session.set("verdict", _OK if message is None else message.encode())
        if message is not None:
            raise KVLayoutMismatch(message, layout.diff(peer_layout))
        bind = "" if self.host in ("", "0.0.0.0") else self.host
        return _open(store, prefix, DECODE_RANK, self.device, bind, peer_id, timeout)

    def close(self) -> None:
        self._store = None  # channels already built do not need the store any more


def connect_channel(
    host: str, port: int, peer_id: str, layout: KVLayout, device: str = "cpu", timeout: float = 60.0
) -> KVChannel:
    """Prefill side: join the decode listener at host:port as `peer_id` (unique per prefill worker)."""
    try:
        store = dist.TCPStore(host, port, None, False, _timedelta(timeout))
    except (RuntimeError, dist.DistError) as e:
        raise ChannelTimeout(f"cannot reach the KV listener at {host}:{port} within {timeout}s: {e}") from e
    nonce = uuid.uuid4().hex
    prefix = f"kv/{peer_id}/{nonce}"
    session = dist.PrefixStore(prefix, store)
    session.set("prefill_layout", layout.to_bytes())
    store.set(_join_key(peer_id), nonce)
    _wait(session, ["verdict"], timeout, f"decode worker at {host}:{port} to accept {peer_id!r}")
    verdict = session.get("verdict")
    if verdict != _OK:
        decode_layout = KVLayout.from_bytes(session.get("decode_layout"))
        raise KVLayoutMismatch(verdict.decode(), decode_layout.diff(layout))
    return _open(
        store,
        prefix,
        PREFILL_RANK,
        torch.device(device),
        _local_address_towards(host, port),
        peer_id,
        timeout,
    )
