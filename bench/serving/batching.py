"""`pdserve bench batching`: decode tok/s of N streams, the engine alone vs through a running cluster."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from bench.serving.loopback import check_loopback
from proto.api import pb, pb_grpc

GOAL_RATIO = 0.95  # issue 14: the cluster holds >= 95% of the engine's own decode tok/s at the same batch
_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class EngineRun:
    streams: int
    decode_tok_s: float  # tokens sampled in decode-only steps / their wall time
    decode_step_ms: float
    prefill_s: float  # wall time of the steps that computed prompt tokens
    cpu_cores: float  # this process's CPU seconds / wall seconds over the decode-only steps


@dataclass(frozen=True)
class ClusterRun:
    streams: int
    decode_tok_s: float  # tokens streamed while every stream was past its first token and none had ended
    window_s: float
    overall_tok_s: float  # every token / (last token - first send): prefill included
    prefill_share: float  # share of the run before the last stream's first token
    cpu_cores: dict[str, float]  # process group -> cores busy during the decode window (from /proc)


def prompt_ids(i: int, n: int) -> list[int]:
    return [1000 + (i * 7919 + j * 104729) % 40000 for j in range(n)]


def run_engine(streams: int, prompt_len: int, max_tokens: int, threads: int) -> EngineRun:
    """The engine in this process, as the decode worker builds it (EngineConfig defaults, CPU, fp32)."""
    import torch

    from contracts.sampling import SamplingParams
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    torch.set_num_threads(threads)
    engine = LLMEngine(EngineConfig())
    sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    for i in range(streams):
        engine.add_request(f"e{i}", prompt_ids(i, prompt_len), sampling)
    decode_s = prefill_s = decode_cpu = 0.0
    decode_tokens = decode_steps = 0
    while engine.has_work():
        t0, cpu0 = time.perf_counter(), time.process_time()
        batch = engine.schedule()
        engine.postprocess(batch, engine.execute(batch))
        dt = time.perf_counter() - t0
        if all(c.seq.num_prompt_tokens <= c.start for c in batch.chunks):
            decode_cpu += time.process_time() - cpu0
            decode_s += dt
            decode_tokens += len(batch.chunks)
            decode_steps += 1
        else:
            prefill_s += dt
    return EngineRun(streams, decode_tokens / decode_s, decode_s / decode_steps * 1e3, prefill_s,
                     decode_cpu / decode_s)


def _cpu_by_group() -> dict[str, float]:
    """CPU seconds so far of this box's pdserve processes, grouped by role (Linux /proc)."""
    groups: dict[str, float] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if cmd.startswith("ray::DecodeWorker"):
            group = "decode worker"
        elif cmd.startswith("ray::PrefillWorker"):
            group = "prefill worker"
        elif "deploy.cli up" in cmd or "pdserve up" in cmd:
            group = "router (pdserve up)"
        elif int(pid) == os.getpid():
            group = "bench client"
        elif any(k in cmd for k in ("raylet", "gcs_server", "ray/_private", "ray::")):
            group = "ray (other)"
        else:
            continue
        groups[group] = groups.get(group, 0.0) + (int(fields[11]) + int(fields[12])) / _TICK
    return groups


async def run_cluster(address: str, streams: int, prompt_len: int, max_tokens: int) -> ClusterRun:
    check_loopback(address)
    sampling = pb.SamplingOptions(max_tokens=max_tokens, ignore_eos=True)
    arrivals: list[list[float]] = [[] for _ in range(streams)]
    cpu_marks: list[tuple[float, dict[str, float]]] = []

    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.PDServeStub(channel)

        async def one(i: int) -> None:
            ids = pb.TokenIds(ids=prompt_ids(i, prompt_len))
            request = pb.GenerateRequest(token_ids=ids, sampling=sampling)
            async for r in stub.Generate(request):
                if r.HasField("delta"):
                    now = time.perf_counter()
                    arrivals[i].extend(now for _ in r.delta.token_ids)
                    if i == 0 and len(arrivals[0]) in (max_tokens // 4, 3 * max_tokens // 4):
                        cpu_marks.append((now, _cpu_by_group()))

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(streams)))
    start = max(a[0] for a in arrivals)  # every stream decoding from here ...
    end = min(a[-1] for a in arrivals)  # ... until the first one ends
    in_window = sum(start <= t <= end for a in arrivals for t in a)
    last = max(a[-1] for a in arrivals)
    cores: dict[str, float] = {}
    if len(cpu_marks) == 2:
        (ta, ca), (tb, cb) = cpu_marks
        cores = {g: round((cb[g] - ca.get(g, 0.0)) / (tb - ta), 3) for g in cb}
    return ClusterRun(streams, in_window / (end - start), end - start,
                      sum(map(len, arrivals)) / (last - t0), (start - t0) / (last - t0), cores)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdserve bench batching", description="Decode throughput of N "
                                "concurrent streams: the engine alone (in this process) vs the running "
                                "cluster at --address, one after the other; where the cluster's time went")
    p.add_argument("--address", default="127.0.0.1:50051", help="router gRPC address (loopback only)")
    p.add_argument("--streams", default="16,32", help="batch sizes, comma-separated (default 16,32)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    # Ray starts the workers with OMP_NUM_THREADS=1 (actors of num_cpus=0): same batch, same threads.
    p.add_argument("--engine-threads", type=int, default=1, help="torch threads of the engine alone "
                   "(default 1: what a Ray worker gets)")
    p.add_argument("--json", type=Path, default=None, dest="json_out")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_loopback(args.address)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    rows = []
    for n in (int(x) for x in args.streams.split(",")):
        eng = run_engine(n, args.prompt_len, args.max_tokens, args.engine_threads)
        print(f"engine alone, {n} streams: {eng.decode_tok_s:.1f} tok/s decoding "
              f"({eng.decode_step_ms:.0f} ms a step, {eng.cpu_cores:.2f} cores busy), prefill "
              f"{eng.prefill_s:.1f} s", flush=True)
        clu = asyncio.run(run_cluster(args.address, n, args.prompt_len, args.max_tokens))
        ratio = clu.decode_tok_s / eng.decode_tok_s
        # On a shared box each side got what CPU it could: compare tokens per core-second as well.
        cluster_cores = sum(v for g, v in clu.cpu_cores.items() if g != "bench client")
        per_core = (clu.decode_tok_s / cluster_cores) / (eng.decode_tok_s / eng.cpu_cores) \
            if cluster_cores and eng.cpu_cores else float("nan")
        print(f"cluster,      {n} streams: {clu.decode_tok_s:.1f} tok/s decoding "
              f"(window {clu.window_s:.1f} s), {clu.overall_tok_s:.1f} tok/s overall, prefill "
              f"{clu.prefill_share:.0%} of the run; cores busy in the window: {clu.cpu_cores}", flush=True)
        print(f"goal cluster >= {GOAL_RATIO:.0%} of the engine at {n} streams: {ratio:.1%} = "
              f"{ratio / GOAL_RATIO:.2f}x the goal; per core-second used (the cluster's processes together): "
              f"{per_core:.1%}", flush=True)
        rows.append({"engine": asdict(eng), "cluster": asdict(clu), "ratio": ratio,
                     "per_core_ratio": per_core})
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({"config": vars(args) | {"json_out": str(args.json_out)},
                                             "rows": rows}, indent=1))
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
