"""Timing taps on the real prefill/decode services, the bare send/recv bandwidth loop, weight fingerprints."""
from __future__ import annotations

import datetime
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from decode_worker.api import Reservation, ReserveRequest
from decode_worker.service import DecodeService
from decode_worker.streams import RequestStream
from kv_transfer.receiver import KVReceiver
from prefill_worker.service import PrefillService, _Pending

# Both sides stamp time with CLOCK_MONOTONIC (time.monotonic; perf_counter is the same clock on Linux), which
# is one system-wide clock: stamps from the two processes of one host can be subtracted.
_PERF_TO_MONOTONIC = time.monotonic() - time.perf_counter()


@dataclass(frozen=True)
class PrefillStamps:
    """One request's moments on the prefill side, on the monotonic clock."""

    arrived: float
    started: float
    computed: float  # last layer of the final chunk computed (and the first token sampled)
    first_frame: float  # first KV frame handed to the channel
    bytes_sent: int


@dataclass(frozen=True)
class DecodeStamps:
    """One request's KV arrival on the decode side, on the monotonic clock."""

    first_frame: float
    holding_all_kv: float  # FINAL frame applied and every scatter landed (receiver DONE)
    bytes_received: int


class TimedPrefillService(PrefillService):
    """PrefillService unchanged, plus the sender's own completion stamps.

    The service's PrefillResult times "all sent" when its engine thread polls the sender, which an idle
    thread does every few ms; at 1k-token prompts on a GPU that is the same order as what is measured.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.stamps: dict[str, PrefillStamps] = {}

    def _finish(self, pending: _Pending) -> None:
        computed = pending.computed if pending.computed is not None else time.perf_counter()
        started = pending.started if pending.started is not None else pending.arrived
        first_frame = pending.sender.first_frame_at
        self.stamps[pending.request.request_id] = PrefillStamps(
            arrived=pending.arrived + _PERF_TO_MONOTONIC,
            started=started + _PERF_TO_MONOTONIC,
            computed=computed + _PERF_TO_MONOTONIC,
            first_frame=first_frame if first_frame is not None else computed + _PERF_TO_MONOTONIC,
            bytes_sent=pending.sender.bytes_sent,
        )
        super()._finish(pending)  # resolves the caller's future: the stamps are in place before it wakes


class TimedDecodeService(DecodeService):
    """DecodeService unchanged, plus a handle on each request's KVReceiver (its stamps are read once DONE)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._bench_receivers: dict[str, KVReceiver] = {}

    def _reserve(self, req: ReserveRequest, stream: RequestStream) -> Reservation:
        reservation = super()._reserve(req, stream)
        receiver = self._receivers.get(req.request_id)
        if receiver is not None:
            self._bench_receivers[req.request_id] = receiver
        return reservation

    def stamps(self, request_id: str) -> DecodeStamps:
        receiver = self._bench_receivers.pop(request_id)
        if receiver.first_frame_at is None or receiver.finished_at is None:
            raise RuntimeError(f"{request_id}: KV receive did not complete ({receiver!r})")
        return DecodeStamps(receiver.first_frame_at, receiver.finished_at, receiver.bytes_received)


# ---- the bare send/recv loop: what the link gives with no framing, gathers or compute ----

def pair_group(store: dist.Store, rank: int, device: torch.device) -> dist.ProcessGroup:
    """A two-rank group of its own (rank 0 = decode side, receives; rank 1 = prefill side, sends)."""
    if device.type == "cuda":
        return dist.ProcessGroupNCCL(store, rank, 2, dist.ProcessGroupNCCL.Options())
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = datetime.timedelta(minutes=10)
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    return dist.ProcessGroupGloo(store, rank, 2, opts)


def close_pair_group(group: dist.ProcessGroup, device: torch.device) -> None:
    """NCCL: abort the idle communicator explicitly, not via a destructor at interpreter exit."""
    if device.type == "cuda":
        group.abort()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ping(group: dist.ProcessGroup, rank: int, device: torch.device) -> None:
    """Both sides leave this together (to within one small message), so the receiver's clock starts fairly."""
    token = torch.zeros(1, dtype=torch.int64, device=device)
    (group.send if rank == 1 else group.recv)([token], 1 - rank, 0).wait()
    _sync(device)


def bare_send_recv_seconds(group: dist.ProcessGroup, rank: int, device: torch.device,
                           message_bytes: list[int], repeats: int) -> float:
    """Best time, seen by the receiver, to move `message_bytes` (one message each, back to back)."""
    buffers = [torch.full((n,), 7, dtype=torch.uint8, device=device) for n in message_bytes]
    best = float("inf")
    for i in range(repeats + 1):  # the first round is warm-up (NCCL connects its p2p channels lazily)
        _ping(group, rank, device)
        start = time.monotonic()
        if rank == 1:
            works = [group.send([b], 0, 0) for b in buffers]
        else:
            works = [group.recv([b], 1, 0) for b in buffers]
        for work in works:
            work.wait()
        _sync(device)
        if i:
            best = min(best, time.monotonic() - start)
    if rank == 0 and any(int(b[-1]) != 7 for b in buffers if b.numel()):
        raise RuntimeError("bare send/recv loop delivered wrong bytes")
    return best


def weights_fingerprint(model: torch.nn.Module) -> list[int]:
    """Integer sums of every parameter's raw bits, sorted: exact, order- and layout-free, no host copy."""
    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    sums = [int(p.detach().view(bits[p.element_size()]).sum(dtype=torch.int64)) for p in model.parameters()]
    return sorted(sums)
