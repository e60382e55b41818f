"""Fits the simulator's step costs: CPU from the harness's per-request JSON, H100 from decode_gpu.json."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.serving.sim_costs import DecodeCost, PrefillCost, StepCosts, TransferCost

# SmolLM2-135M (the CPU cluster's embedded model): 30 layers x 3 KV heads x head_dim 64, k and v, fp32.
CPU_KV_BYTES_PER_TOKEN = 30 * 3 * 64 * 2 * 4
CPU_LAYERS = 30
# Llama-3-8B: 32 layers x 8 KV heads x head_dim 128, k and v, bf16; 4096 hidden for the attention FLOPs.
LLAMA8B_KV_BYTES_PER_TOKEN = 32 * 8 * 128 * 2 * 2
LLAMA8B_LAYERS = 32
LLAMA8B_PAIR_FLOPS = 4 * 32 * 4096  # QK^T and PV: 2 multiply-adds a (query, key) pair, per layer and channel


@dataclass(frozen=True)
class Obs:
    """One measured request as the fit reads it (seconds)."""
    sent: float
    prompt: int
    output: int
    ttft: float
    tpot: float | None
    e2e: float


def harness_runs(path: str | Path) -> list[tuple[float, list[dict]]]:
    """(offered rate, records) of each run in a `pdserve bench --json` file: the single run or every probe."""
    return [(rate, recs) for _, rate, recs in named_runs(path)]


def named_runs(path: str | Path) -> list[tuple[str, float, list[dict]]]:
    """(name, offered rate, records) of each run in a `pdserve bench --json` file. Names are how validation
    and cross-validation refer to a run: the file's stem without `serving_cpu_`, `@rate` for a sweep probe;
    the sweep's goodput is the stem alone."""
    d = json.loads(Path(path).read_text())
    stem = Path(path).stem.removeprefix("serving_cpu_")
    if d.get("sweep"):
        return [(f"{stem}@{p['rate']:g}", p["rate"], p["records"]) for p in d["sweep"]["probes"]]
    return [(stem, d["rate"], d["records"])]


def observations(records: list[dict]) -> list[Obs]:
    return [Obs(r["sent_at"], r["prompt_tokens"], r["output_tokens"], r["ttft"], r["tpot"], r["e2e"])
            for r in records if r["status"] == "OK" and r["ttft"] is not None]


def isolated(obs: list[Obs]) -> list[Obs]:
    """Requests sent while nothing else was in flight: their TTFT is the path's own cost, no queue."""
    return [o for o in obs if not any(p is not o and p.sent <= o.sent < p.sent + p.e2e for p in obs)]


def fit_prefill(iso: list[Obs]) -> PrefillCost:
    """TTFT (ms) of isolated requests ~ fixed + per_token * n + per_pair * n^2 / 2, least squares; the pair
    term is dropped when the data make it negative (short prompts cannot separate it)."""
    n = np.array([o.prompt for o in iso], dtype=float)
    y = np.array([o.ttft * 1e3 for o in iso])
    full = np.linalg.lstsq(np.stack([np.ones_like(n), n, n * n / 2], 1), y, rcond=None)[0]
    if len(set(n)) >= 3 and min(full) >= 0:
        return PrefillCost(*map(float, full))
    if len(set(n)) >= 2:
        lin = np.linalg.lstsq(np.stack([np.ones_like(n), n], 1), y, rcond=None)[0]
        if min(lin) >= 0:
            return PrefillCost(float(lin[0]), float(lin[1]))
    return PrefillCost(float(np.mean(y)), 0.0)  # one prompt length: everything in the fixed part


def residuals_ms(lone: list[Obs], prefill: PrefillCost) -> tuple[float, ...]:
    """Lone requests' TTFT minus the prefill fit's prediction (ms), sorted: what the same request on an idle
    cluster varies by (the shared box, the hops), which the simulator replays as path latency."""
    return tuple(sorted(round(o.ttft * 1e3 - prefill.step_ms([(o.prompt, 0)]), 1) for o in lone))


def fit_h100(path: str | Path, transfer_gb_per_s: float = 25.0,
             transfer_latency_ms: float = 1.0) -> StepCosts:
    """Llama-3-8B on one H100 from bench/results/decode_gpu.json: decode by least squares over the measured
    (batch, context) steps; prefill's fixed part = the bs1 decode step (every step reads all weights), its
    per-token and per-pair parts = FLOPs at the rate that reproduces the measured 2048-token prefill."""
    d = json.loads(Path(path).read_text())
    pts = [r for r in d["decode"] if "ours_step_ms" in r]
    b = np.array([r["batch"] for r in pts], dtype=float)
    ctx = np.array([r["context"] for r in pts], dtype=float)
    y = np.array([r["ours_step_ms"] for r in pts])
    coef = np.linalg.lstsq(np.stack([np.ones_like(b), b, b * ctx], 1), y, rcond=None)[0]
    decode = DecodeCost(*map(float, coef))
    fixed = min(r["ours_step_ms"] for r in pts if r["batch"] == 1)
    n, ms = d["prefill"]["tokens"], d["prefill"]["step_ms"]
    token_flops = d["weight_bytes_per_step"]  # bf16: 2 bytes a weight, 2 FLOPs a weight per token
    flops = n * token_flops + n * n / 2 * LLAMA8B_PAIR_FLOPS
    ms_per_flop = (ms - fixed) / flops
    prefill = PrefillCost(fixed, token_flops * ms_per_flop, LLAMA8B_PAIR_FLOPS * ms_per_flop)
    return StepCosts(
        prefill=prefill, decode=decode,
        transfer=TransferCost(LLAMA8B_KV_BYTES_PER_TOKEN, LLAMA8B_LAYERS, transfer_gb_per_s,
                              transfer_latency_ms),
        source={
            "decode": f"least squares over the {len(pts)} measured decode steps (ours_step_ms) of {path}",
            "prefill": f"{path}: fixed = bs1 decode step; {n}-token prefill in {ms:.1f} ms sets FLOP/s",
            "transfer": f"assumed {transfer_gb_per_s} GB/s per GPU (no 2-GPU KV transfer run exists yet: "
                        "docs/benchmarks.md 'Not run yet'); Llama-3-8B KV shape",
        })
