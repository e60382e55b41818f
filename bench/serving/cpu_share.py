"""`python -m bench.serving.cpu_share`: where a bench run's CPU goes (workers, router, Ray, client)."""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

TICKS_PER_S = os.sysconf("SC_CLK_TCK")
# By command line, first match wins: a `bench compare` cluster's processes (deploy/launcher.py's actors).
ROLES = (("client", "bench compare"), ("router process", "deploy.cli up"),
         ("prefill worker", "PrefillWorker"), ("decode worker", "DecodeWorker"), ("ray", "ray"))


def role(cmdline: str) -> str:
    return next((name for name, key in ROLES if key in cmdline), "other")


def snapshot() -> dict[int, tuple[int, str]]:
    """pid -> (utime + stime in clock ticks, command line) of every process that has used any CPU."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
            cmd = " ".join(raw.decode(errors="replace").replace("\0", " ").split())  # one line, always
        except OSError:
            continue  # ended meanwhile
        fields = stat[stat.rfind(")") + 2:].split()
        ticks = int(fields[11]) + int(fields[12])
        if ticks:
            out[int(pid)] = (ticks, cmd.strip()[:200] or stat[stat.find("(") + 1:stat.rfind(")")])
    return out


def sample(path: Path, seconds: float, every: float = 5.0) -> None:
    """Appends a snapshot every `every` seconds for `seconds`: `T <unix time>`, then `pid ticks cmdline`."""
    end = time.time() + seconds
    with path.open("a") as out:
        while time.time() < end:
            rows = "".join(f"{pid} {ticks} {cmd}\n" for pid, (ticks, cmd) in snapshot().items())
            out.write(f"T {time.time():.2f}\n{rows}")
            out.flush()
            time.sleep(every)


def read(path: Path) -> Iterator[tuple[float, dict[int, tuple[int, str]]]]:
    t, procs = None, {}
    for line in path.read_text().splitlines():
        if line.startswith("T "):
            if t is not None:
                yield t, procs
            t, procs = float(line[2:]), {}
        elif t is not None:
            pid, ticks, cmd = (line.split(" ", 2) + [""])[:3]
            if pid.isdigit() and ticks.isdigit():  # (older logs: a command line's own newlines)
                procs[int(pid)] = (int(ticks), cmd)
    if t is not None:
        yield t, procs


def per_cluster(path: Path) -> list[tuple[int, float, dict[str, float]]]:
    """For each `pdserve up` process in the log: (its pid, seconds it lived, cores each role used meanwhile),
    each process counted from its first snapshot in that window (from 0 if it was born in it) to its last."""
    samples = list(read(path))
    lived: dict[int, list[float]] = {}
    for t, procs in samples:
        for pid, (_, cmd) in procs.items():
            if role(cmd) == "router process":
                lived.setdefault(pid, [t, t])[1] = t
    out = []
    for up, (t0, t1) in sorted(lived.items(), key=lambda kv: kv[1][0]):
        first: dict[int, tuple[float, int]] = {}
        last: dict[int, tuple[int, str]] = {}
        for t, procs in samples:
            if t0 <= t <= t1:
                for pid, (ticks, cmd) in procs.items():
                    first.setdefault(pid, (t, ticks))
                    last[pid] = (ticks, cmd)
        cores: dict[str, float] = defaultdict(float)
        wall = max(t1 - t0, 1e-9)
        for pid, (ticks, cmd) in last.items():
            born_t, born_ticks = first[pid]
            cores[role(cmd)] += (ticks - (0 if born_t > t0 else born_ticks)) / TICKS_PER_S / wall
        out.append((up, t1 - t0, dict(cores)))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serving.cpu_share", description=__doc__)
    p.add_argument("log", type=Path)
    p.add_argument("--sample", type=float, default=None, metavar="SECONDS",
                   help="append snapshots to LOG for this long (run it beside `pdserve bench compare`); "
                        "without it, summarize LOG")
    args = p.parse_args(argv)
    if args.sample:
        sample(args.log, args.sample)
        return 0
    for up, wall, cores in per_cluster(args.log):
        print(f"pdserve up pid {up}, {wall:.0f} s: " + ", ".join(
            f"{name} {c:.2f}" for name, c in sorted(cores.items(), key=lambda kv: -kv[1])) + " cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
