"""Can two processes share one GPU over ProcessGroupNCCL? (issue 5: "two processes on one GPU where NCCL
permits").

    python -m bench.nccl_one_gpu_check        # on a machine with one CUDA device

Two spawned ranks, both on cuda:0, join an NCCL group and send 4 MB from rank 0 to rank 1. Each rank prints
"ok" with the value it holds, or the error NCCL gave. Exit 0 when both ranks got through, 1 otherwise, 2
without CUDA. (torch 2.11 + NCCL 2.28.9 on an H100: "Duplicate GPU detected", so on one GPU the KV transfer
benchmark runs only over gloo.)
"""
from __future__ import annotations

import os
import queue
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench._cuda import cuda_missing


def _rank(rank: int, port: int, results) -> None:  # type: ignore[no-untyped-def]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(0)
    try:
        dist.init_process_group("nccl", rank=rank, world_size=2, device_id=torch.device("cuda:0"))
        t = torch.full((1 << 20,), float(rank + 1), device="cuda:0")
        if rank == 0:
            dist.send(t, 1)
        else:
            dist.recv(t, 0)
        torch.cuda.synchronize()
        results.put((rank, True, f"ok, holds {t[0].item():.0f}"))
        dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001 - the point is to report whatever NCCL says
        results.put((rank, False, f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"))


def main(argv: list[str] | None = None) -> int:
    if cuda_missing(__file__):
        return 2
    print(f"torch {torch.__version__}, NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}, "
          f"{torch.cuda.get_device_name(0)}", flush=True)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, 29533, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = []
    for _ in procs:  # a rank that hangs (NCCL waiting for a peer that failed) reports nothing
        try:
            got.append(results.get(timeout=120))
        except queue.Empty:
            break
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
    for rank, _, message in sorted(got):
        print(f"rank {rank}: {message}")
    return 0 if len(got) == 2 and all(ok for _, ok, _ in got) else 1


if __name__ == "__main__":
    sys.exit(main())
