"""A TP worker's process seam: rank 0 is the calling process (the worker's one Ray actor) and ranks 1..N-1 are
follower processes it spawns (torch.multiprocessing), each loading and sharding the model, following rank 0.

One actor plus spawned followers, not a placement group of N actors: the router, the supervisor's restarts and
the KV channels keep addressing one actor per worker; the followers hold no state anyone else talks to, and
their lifetime is the actor's (daemon processes, stopped by `close` or dying with it). The actor asks Ray for
the worker's N GPUs, and rank r uses cuda:r of those it sees.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from contracts.stats import TPRankInfo
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.tp.group import TPGroup
from engine.tp.shard import ShardPlan

_JOIN_TIMEOUT = timedelta(seconds=300)  # followers load the whole model before they shard it
_PARENT_POLL_S = 0.5


def rank_config(config: EngineConfig, rank: int) -> EngineConfig:
    """The rank's device: cuda → cuda:rank; CPU ranks share the host."""
    device = torch.device(config.device)
    if device.type != "cuda":
        return config
    return dataclasses.replace(config, device=f"cuda:{rank}")


def _exit_with_parent(parent_pid: int) -> None:
    """A daemon thread that ends this follower once the worker process is gone. A SIGKILLed parent runs no
    atexit hook, and prctl's parent-death signal fires when the spawning *thread* exits (an actor may spawn
    from a short-lived thread): polling the parent id is what holds in every case."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="tp-parent-watch", daemon=True).start()


def _follower_main(rank: int, config: EngineConfig, port: int, parent_pid: int) -> None:
    _exit_with_parent(parent_pid)
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
        self.followers = [ctx.Process(target=_follower_main, args=(rank, config, store.port, os.getpid()),
                                      daemon=True,
                                      name=f"tp-rank-{rank}") for rank in range(1, config.tp_size)]
        for process in self.followers:
            process.start()
        self._store = store  # the followers' rendezvous: alive as long as the group
        self._closed = False
        config = rank_config(config, 0)
        try:
            self.engine = LLMEngine(config, progress=progress,
                                    tp=TPGroup.create(store, 0, config.tp_size, config.device))
        except BaseException:
            self._kill_followers(0.0)  # they fail the same way (or wait on rank 0): none outlives this
            raise
        self.ranks = tuple(_rank_info(self.engine, r, config, p.pid if p else os.getpid())
                           for r, p in enumerate([None, *self.followers]))

    @property
    def alive(self) -> bool:
        """Every follower still runs (a dead one leaves rank 0's next collective without a peer)."""
        return all(p.is_alive() for p in self.followers)

    def close(self, timeout: float = 30.0, graceful: bool = True) -> None:
        """Stops the followers' loops and waits for them to exit (killed past `timeout`); idempotent.
        graceful=False kills them at once (rank 0 died mid-step: they may sit inside a collective)."""
        if self._closed:
            return
        self._closed = True
        if graceful and all(p.is_alive() for p in self.followers):  # a dead rank would fail the broadcast
            try:
                self.engine.stop_followers()
            except RuntimeError:  # the group broke under us (a rank died meanwhile): kill what is left
                timeout = 0.0
        else:
            timeout = 0.0
        self._kill_followers(timeout)

    def _kill_followers(self, timeout: float) -> None:
        for process in self.followers:
            process.join(timeout)
            if process.is_alive():
                process.kill()
                process.join()


def _rank_info(engine: LLMEngine, rank: int, config: EngineConfig, pid: int) -> TPRankInfo:
    plan = ShardPlan.of(engine.model_config, rank, config.tp_size)
    return TPRankInfo(rank, str(rank_config(config, rank).device), pid, plan.heads.kv_heads)
