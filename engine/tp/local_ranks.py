"""Runs a function on N local ranks (one process each, torch.multiprocessing spawn) joined in one TP group;
tests and benchmarks use it, and it is how a TP worker's follower ranks would be started on one host."""
from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.tp.group import TPGroup


def _rank_main(rank: int, fn: Callable[..., Any], size: int, tmp: str, device: str, threads: int,
               args: tuple) -> None:
    torch.set_num_threads(threads)
    group = TPGroup.create(dist.FileStore(f"{tmp}/store", size), rank, size, device)
    torch.save(fn(group, *args), f"{tmp}/rank{rank}.pt")


def run_local_ranks(fn: Callable[..., Any], size: int, *args: Any, device: str = "cpu",
                    threads: int = 1) -> list[Any]:
    """[fn(group, *args) on rank r for r in range(size)]; `fn` must be importable (spawned processes)."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_main, args=(fn, size, tmp, device, threads, args), nprocs=size, join=True)
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(size)]
