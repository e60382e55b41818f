"""A TP worker's process seam: rank 0 is the calling process (the worker's one Ray actor) and ranks 1..N-1 are
follower processes it spawns (torch.multiprocessing), each loading and sharding the model, following rank 0.

One actor plus spawned followers, not a placement group of N actors: the router, the supervisor's restarts and
the KV channels keep addressing one actor per worker; the followers hold no state anyone else talks to, and
their lifetime is the actor's (daemon processes, stopped by `close` or dying with it). The actor asks Ray for
the worker's N GPUs, and rank r uses cuda:r of those it sees.
"""
from __future__ import annotations

import dataclasses
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.tp.group import TPGroup

_JOIN_TIMEOUT = timedelta(seconds=300)  # followers load the whole model before they shard it


def rank_config(config: EngineConfig, rank: int) -> EngineConfig:
    """The rank's device: cuda → cuda:rank; CPU ranks share the host."""
    device = torch.device(config.device)
    if device.type != "cuda":
        return config
    return dataclasses.replace(config, device=f"cuda:{rank}")


def _follower_main(rank: int, config: EngineConfig, port: int) -> None:
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    config = rank_config(config, rank)
    store = dist.TCPStore("127.0.0.1", port, config.tp_size, is_master=False, timeout=_JOIN_TIMEOUT)
    group = TPGroup.create(store, rank, config.tp_size, config.device)
    LLMEngine(config, tp=group).follow()


class LocalTPRanks:
    """`engine` is rank 0's LLMEngine (schedule, execute and sample on it as on any engine); the followers run
    its steps. `close()` ends them."""

    def __init__(self, config: EngineConfig, progress: bool = False) -> None:
        if config.tp_size < 2:
            raise ValueError(f"LocalTPRanks is for tp_size >= 2, got {config.tp_size}")
        store = dist.TCPStore("127.0.0.1", 0, config.tp_size, is_master=True, timeout=_JOIN_TIMEOUT,
                              wait_for_workers=False)
        ctx = mp.get_context("spawn")
        self.followers = [ctx.Process(target=_follower_main, args=(rank, config, store.port), daemon=True,
                                      name=f"tp-rank-{rank}") for rank in range(1, config.tp_size)]
        for process in self.followers:
            process.start()
        self._store = store  # the followers' rendezvous: alive as long as the group
        config = rank_config(config, 0)
        self.engine = LLMEngine(config, progress=progress, tp=TPGroup.create(store, 0, config.tp_size,
                                                                             config.device))

    def close(self, timeout: float = 30.0) -> None:
        """Stops the followers' loops and waits for them to exit (killed past `timeout`)."""
        self.engine.stop_followers()
        for process in self.followers:
            process.join(timeout)
            if process.is_alive():
                process.kill()
                process.join()
