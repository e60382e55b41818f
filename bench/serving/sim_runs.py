"""Reads a measured run file for the simulator: its runs, the cluster it ran on, each request's prefix."""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from bench.serving.sim_events import ClusterSpec, SimRequest
from bench.serving.sim_host import placement_kind
from bench.serving.workload import SharedPrefix

# What `pdserve up --device cpu` ran at eadcd02, where the first CPU runs were taken (files without
# `up_flags`): 1 prefill + 1 decode worker, no fair prefill, no prefix cache.
LEGACY_CLUSTER = ClusterSpec("disagg", prefill_workers=1, decode_workers=1)


def cluster_for(up_flags: list[str] | None, max_prompt: int = 0) -> ClusterSpec:
    """The spec the simulator replays a run on, from the `pdserve up` flags `bench compare` recorded
    (deploy/cli.py's defaults for what they leave out): pure 1P+1D (threshold 0), colocated (a threshold
    no prompt of the run exceeds, `max_prompt` its longest: the prefill workers idle), or conditional
    (`cost`). A threshold that splits the run's prompts is not modelled and is refused."""
    if up_flags is None:
        return LEGACY_CLUSTER
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--prefill", type=int, default=1)
    p.add_argument("--decode", type=int, default=1)
    p.add_argument("--prefix-caching", default="on")
    p.add_argument("--long-prefill-threshold", type=int, default=128)
    p.add_argument("--prefill-placement", default="cost")
    p.add_argument("--local-prefill-max-tokens", type=int, default=0)
    p.add_argument("--fused-max-slowdown", type=float, default=1.35)
    a, _ = p.parse_known_args(up_flags)
    if a.prefill_placement == "cost":
        mode = "cond"
    elif a.prefill_placement == "threshold" and a.local_prefill_max_tokens == 0:
        mode = "disagg"
    elif a.prefill_placement == "threshold" and a.local_prefill_max_tokens >= max_prompt > 0:
        mode = "coloc"
    else:
        raise ValueError(f"up flags {' '.join(up_flags)}: the simulator models pure 1P+1D (threshold 0), "
                         "colocated (a threshold above every prompt of the run) and `cost` placement")
    return ClusterSpec(mode, prefill_workers=a.prefill, decode_workers=a.decode,
                       long_prefill_threshold=a.long_prefill_threshold,
                       prefix_caching=a.prefix_caching == "on",
                       fused_max_slowdown=0.0 if mode == "disagg" else a.fused_max_slowdown)


def prefixes(config: dict) -> list[tuple[int, int] | None]:
    """Each request's shared prefix as (system prompt index, its tokens), in send order, by
    workload.synthesize's rule (users take turns in order, user u reads system prompt u mod systems);
    None without --shared-prefix."""
    n, sp = config["num_requests"], config.get("shared_prefix")
    n = n[0] if isinstance(n, list) else n  # older harness JSON kept it as a one-item list
    if not sp:
        return [None] * n
    s = SharedPrefix(*sp)
    return [((k % (s.systems * s.users)) % s.systems, s.prefix_len) for k in range(n)]


@dataclass(frozen=True)
class RunFile:
    """One configuration's result: `pdserve bench --json`, or one entry of `pdserve bench compare --json`."""
    stem: str  # the file's stem without serving_cpu_: how validation names its runs
    data: dict
    spec: ClusterSpec
    prefix_of: tuple[tuple[int, int] | None, ...]
    placement: str  # sim_host.placement_kind: how its workers sat on the cores, which picks its contention

    @property
    def config(self) -> dict:
        return self.data["config"]

    def named(self) -> list[tuple[str, float, list[dict]]]:
        """(name, offered rate, records) of the single run or of every sweep probe (`stem@rate`)."""
        d = self.data
        if d.get("sweep"):
            return [(f"{self.stem}@{p['rate']:g}", p["rate"], p["records"]) for p in d["sweep"]["probes"]]
        return [(self.stem, d["rate"], d["records"])]

    def replay(self, records: list[dict]) -> list[SimRequest]:
        """The measured requests as they were sent: same send times, lengths, warm-up marks and prefixes."""
        return [SimRequest(r["sent_at"], r["prompt_tokens"], r["output_tokens"], r["warmup"],
                           self.prefix(r["index"]))
                for r in sorted(records, key=lambda r: r["index"]) if r["status"] == "OK"]

    def prefix(self, index: int) -> tuple[int, int] | None:
        return self.prefix_of[index] if index < len(self.prefix_of) else None


def load_runs(path: str | Path) -> list[RunFile]:
    """`pdserve bench --json` (one run) or `bench compare --json` (one per configuration, named
    `stem:label` where the file holds several: a one-run comparison replays as its configurations)."""
    d = json.loads(Path(path).read_text())
    entries = d if isinstance(d, list) else [d]
    stem = Path(path).stem.removeprefix("serving_cpu_")
    return [_run_file(f"{stem}:{e['label']}" if len(entries) > 1 else stem, e) for e in entries]


def load_run(path: str | Path) -> RunFile:
    runs = load_runs(path)
    if len(runs) != 1:
        raise ValueError(f"{path}: {len(runs)} configurations; expected one")
    return runs[0]


def _run_file(stem: str, d: dict) -> RunFile:
    pre = prefixes(d["config"]) if d["config"].get("shared_prefix") else []
    runs = d["sweep"]["probes"] if d.get("sweep") else [d]
    longest = max((r["prompt_tokens"] for run in runs for r in run["records"]), default=0)
    return RunFile(stem, d, cluster_for(d.get("up_flags"), longest), tuple(pre),
                   placement_kind(d.get("up_flags")))
