"""Fits the simulator's step costs: CPU from the harness's per-request JSON, H100 from decode_gpu.json."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.serving.sim_costs import DecodeCost, PrefillCost, StepCosts, TransferCost
from bench.serving.sim_runs import RunFile
from bench.serving.sim_spread import StepSpread, fit_spread

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
    cached: int = 0  # prompt tokens the prefill worker's prefix cache held for it

    @property
    def chunk(self) -> tuple[int, int]:
        """Its prefill as one chunk: (tokens computed, tokens cached before them)."""
        return self.prompt - self.cached, self.cached


def observations(run: RunFile, records: list[dict]) -> list[Obs]:
    """The run's OK requests; a request's cache hit is what the simulator would give it on the prefill
    worker (SimRequest.prefix): an earlier request of the run carried the same prefix."""
    spec, seen, out = run.spec, set(), []
    for r in sorted(records, key=lambda r: r["index"]):
        if r["status"] != "OK" or r["ttft"] is None:
            continue
        prefix, cached = run.prefix(r["index"]), 0
        if spec.prefix_caching and prefix:
            if prefix[0] in seen:
                cached = min(prefix[1], r["prompt_tokens"] - 1) // spec.block_size * spec.block_size
            seen.add(prefix[0])
        out.append(Obs(r["sent_at"], r["prompt_tokens"], r["output_tokens"], r["ttft"], r["tpot"], r["e2e"],
                       cached))
    return out


def isolated(obs: list[Obs]) -> list[Obs]:
    """Requests sent while nothing else was in flight: their TTFT is the path's own cost, no queue."""
    return [o for o in obs if not any(p is not o and p.sent <= o.sent < p.sent + p.e2e for p in obs)]


def fit_prefill(iso: list[Obs]) -> PrefillCost:
    """TTFT (ms) of isolated requests ~ fixed + per_token * n + per_pair * n * (cached + n / 2) over the
    n tokens each computed, least squares; the pair term is dropped when the data make it negative (short
    prompts cannot separate it)."""
    n = np.array([o.chunk[0] for o in iso], dtype=float)
    pairs = np.array([o.chunk[0] * (o.chunk[1] + o.chunk[0] / 2) for o in iso], dtype=float)
    y = np.array([o.ttft * 1e3 for o in iso])
    full = np.linalg.lstsq(np.stack([np.ones_like(n), n, pairs], 1), y, rcond=None)[0]
    if len(set(n)) >= 3 and min(full) >= 0:
        return PrefillCost(*map(float, full))
    if len(set(n)) >= 2:
        lin = np.linalg.lstsq(np.stack([np.ones_like(n), n], 1), y, rcond=None)[0]
        if min(lin) >= 0:
            return PrefillCost(float(lin[0]), float(lin[1]))
    return PrefillCost(float(np.mean(y)), 0.0)  # one prompt length: everything in the fixed part


@dataclass(frozen=True)
class EngineSteps:
    """The engine alone's step costs (bench/serving/sim_engine.py's JSON): a prefill step's cost over the
    tokens it computes and the cached ones they attend to, and what one more stream adds to a decode step."""
    prefill: PrefillCost
    per_seq_ms: float
    source: str
    # The spread of a step's time over its point's (sim_spread.py), from every timed step when the JSON has
    # them: a prefill step over its prompt length's median (the regression reads medians), a decode step
    # over its batch's mean (the one-stream step is pinned to a TPOT, a mean over steps).
    prefill_spread: StepSpread | None = None
    decode_spread: StepSpread | None = None

    @staticmethod
    def load(path: str | Path) -> EngineSteps:
        d = json.loads(Path(path).read_text())
        n = np.array([p["tokens"] for p in d["prefill"]], dtype=float)
        pairs = np.array([p["tokens"] * (p.get("cached", 0) + p["tokens"] / 2) for p in d["prefill"]])
        y = np.array([p["step_ms"] for p in d["prefill"]])
        pre = np.linalg.lstsq(np.stack([np.ones_like(n), n, pairs], 1), y, rcond=None)[0]
        prefill = PrefillCost(*map(float, np.maximum(pre, 0.0)))
        b = np.array([p["batch"] for p in d["decode"]], dtype=float)
        ms = np.array([p["step_ms"] for p in d["decode"]])
        slope = float(np.linalg.lstsq(np.stack([np.ones_like(b), b], 1), ms, rcond=None)[0][1])
        pre_steps = [p.get("steps_ms", ()) for p in d["prefill"]]
        dec_steps = [p.get("steps_ms", ()) for p in d["decode"]]
        return EngineSteps(prefill, max(slope, 0.0), f"{path}: least squares over {len(n)} prefill steps "
                           f"({int(n.min())}-{int(n.max())} tokens) and {len(b)} decode steps (batch "
                           f"{int(b.min())}-{int(b.max())}) at their medians; the spread from their "
                           f"{sum(map(len, pre_steps))} and {sum(map(len, dec_steps))} timed steps",
                           fit_spread(pre_steps, "median"), fit_spread(dec_steps, "mean"))


def residuals_ms(lone: list[Obs], prefill: PrefillCost,
                 transfer: TransferCost | None = None) -> tuple[float, ...]:
    """Lone requests' TTFT minus the prefill fit's prediction (ms), sorted: what the same request on an idle
    cluster varies by (the shared box, the hops), which the simulator replays as path latency. With
    `transfer`, its exposed part (which the simulator adds by itself) is taken out too; a cache hit's
    prefix is held by the decode worker as well, so only the rest travels."""
    def exposed(o: Obs, step_ms: float) -> float:
        return transfer.exposed_ms(o.chunk[0], step_ms) if transfer else 0.0

    return tuple(sorted(round(o.ttft * 1e3 - (ms := prefill.step_ms([o.chunk])) - exposed(o, ms), 1)
                        for o in lone))


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
