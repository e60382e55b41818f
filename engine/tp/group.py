"""One worker's tensor-parallel rank group: a torch.distributed process group of its own (gloo on CPU, NCCL on
CUDA), never the default group and never a KV-transfer group."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

_TIMEOUT = timedelta(seconds=120)


@dataclass(frozen=True)
class TPGroup:
    """rank in [0, size); `pg` is a raw ProcessGroup object (collectives are called on it directly, so the
    process's default group and the KV channels' groups stay untouched)."""

    rank: int
    size: int
    pg: Any
    device: torch.device

    @classmethod
    def create(cls, store: dist.Store, rank: int, size: int, device: torch.device | str,
               prefix: str = "tp") -> TPGroup:
        """Joins the group of `size` ranks that rendezvous under `prefix` in `store` (blocks)."""
        if not 0 <= rank < size:
            raise ValueError(f"tp rank {rank} is outside [0, {size})")
        device = torch.device(device)
        group_store = dist.PrefixStore(prefix, store)
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL binds the communicator to the current device
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = _TIMEOUT
            pg = dist.ProcessGroupNCCL(group_store, rank, size, opts)
        else:
            gloo = dist.ProcessGroupGloo._Options()
            gloo._timeout = _TIMEOUT
            gloo._devices = [dist.ProcessGroupGloo.create_default_device()]
            pg = dist.ProcessGroupGloo(group_store, rank, size, gloo)
        return cls(rank, size, pg, device)

    @classmethod
    def tcp(cls, host: str, port: int, rank: int, size: int, device: torch.device | str) -> TPGroup:
        """A group rendezvousing on a TCPStore that rank 0 hosts at host:port."""
        store = dist.TCPStore(host, port, size, is_master=rank == 0, timeout=_TIMEOUT)
        return cls.create(store, rank, size, device)
