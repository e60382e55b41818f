"""Simulated goodput, the P:D and TP search for a GPU count and SLO, and the 8/64/512-GPU projection."""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

from bench.serving.arrivals import arrival_offsets
from bench.serving.goodput import find_goodput
from bench.serving.metrics import Slo, summarize
from bench.serving.sim_costs import StepCosts
from bench.serving.sim_events import ClusterSpec, SimRequest, simulate
from bench.serving.workload import LengthDist, parse_length


@dataclass(frozen=True)
class Mix:
    """A workload and the SLO its goodput is judged by."""
    name: str
    prompt: LengthDist
    output: LengthDist
    slo: Slo


# Llama-3-8B on H100s. Prefill-heavy: long documents in, short answers out (summaries, RAG); decode-heavy:
# short prompts, long answers (chat, code). TTFT SLOs are a few times a lone prompt's prefill; the TPOT SLO
# is 3x a lone decode step, which a colocated step carrying a large prefill chunk cannot meet.
MIXES = {
    "prefill-heavy": Mix("prefill-heavy", parse_length("uniform:1024:4096"), parse_length("uniform:32:128"),
                         Slo(ttft=0.4, tpot=0.02)),
    "decode-heavy": Mix("decode-heavy", parse_length("uniform:128:1024"), parse_length("uniform:256:1024"),
                        Slo(ttft=0.2, tpot=0.02)),
    # The 2-core box's prefill-heavy comparison (docs/benchmarks.md, "Conditional placement priced"): SmolLM2
    # on CPU, TTFT and TPOT 3x a lone request's (the loose SLO; --slo-tpot 0.043485 gives the tight one).
    "cpu-prefill-heavy": Mix("cpu-prefill-heavy", parse_length("uniform:256:512"), parse_length("fixed:16"),
                             Slo(ttft=4.581207, tpot=0.104364)),
}


@dataclass(frozen=True)
class SearchSettings:
    tp_choices: tuple[int, ...] = (1, 2)
    tp_efficiency: float = 0.9  # per doubling of TP (all-reduce, smaller GEMMs)
    unit_max_gpus: int = 8  # one node: a replica's KV moves over NVLink, the router spreads replicas
    coloc_budgets: tuple[int, ...] = (512, 2048)  # colocated gets the better of a small and a whole chunk
    coloc_fused: tuple[float, ...] = (0.0, 1.5)  # and of no split-fused credit and the engine's default 1.5x
    prefill_budget: int = 2048  # a prefill worker's token budget per step
    max_num_seqs: int = 128  # decode batch cap (decode_gpu.json's largest CUDA graph bucket)
    kv_tokens_per_gpu: int = 400_000  # (68 GB free - 15 GB weights) / 128 KiB a token, Llama-3-8B bf16
    seconds: float = 30.0  # simulated arrival window per probe: several lifetimes of a long answer
    min_requests: int = 200
    max_requests: int = 4000
    rel_tol: float = 0.05  # bisection stops when pass and fail are this close
    simulate_top: int = 3  # disaggregated splits simulated, best estimates first (every colocated one is)
    target: float = 0.9
    seed: int = 0
    arrival: str = "poisson"  # or "constant", as the CPU runs were measured
    # CPU units: a colocated unit as many workers as the others (one router's least-loaded dispatch over
    # them, as `pdserve up --decode N` runs), and conditional units (`cost` placement) beside pure splits.
    coloc_pooled: bool = False
    conditional: bool = False


@dataclass(frozen=True)
class Unit:
    """One replica: disagg n_p x TP tp_p prefill + n_d x TP tp_d decode workers, or coloc n_d x TP tp_d."""
    mode: str
    n_p: int
    tp_p: int
    n_d: int
    tp_d: int
    budget: int
    fused: float = 0.0  # colocated and conditional: ClusterSpec.fused_max_slowdown (0 = off)

    @property
    def gpus(self) -> int:
        return self.n_p * self.tp_p + self.n_d * self.tp_d

    def __str__(self) -> str:
        if self.mode == "coloc":
            credit = f" fused credit {self.fused:g}x" if self.fused else ""
            return f"coloc {self.n_d}xTP{self.tp_d} budget {self.budget}{credit}"
        split = f"{self.n_p}P(TP{self.tp_p}):{self.n_d}D(TP{self.tp_d})"
        return f"cond {split} credit {self.fused:g}x" if self.mode == "cond" else split


@dataclass(frozen=True)
class Found:
    unit: Unit
    goodput: float  # req/s of one unit

    @property
    def per_gpu(self) -> float:
        return self.goodput / self.unit.gpus


def workload(mix: Mix, rate: float, s: SearchSettings) -> list[SimRequest]:
    n = int(min(max(rate * s.seconds, s.min_requests), s.max_requests))
    rng = random.Random(s.seed)
    offsets = arrival_offsets(s.arrival, rate, n, s.seed)
    warm = n // 10  # the first tenth fills the pipeline and is left out, as the harness's --warmup does
    return [SimRequest(t, mix.prompt.sample(rng), mix.output.sample(rng), i < warm)
            for i, t in enumerate(offsets)]


def unit_costs(unit: Unit, costs: StepCosts, s: SearchSettings) -> StepCosts:
    """The unit's step costs under its TP: the prefill side's prefill costs, the decode side's decode costs
    (one StepCosts for the event loop; a colocated worker has one TP for both)."""
    pc, dc = costs.with_tp(unit.tp_p, s.tp_efficiency), costs.with_tp(unit.tp_d, s.tp_efficiency)
    if unit.mode == "coloc":
        return dc
    return StepCosts(prefill=pc.prefill, decode=dc.decode, transfer=pc.transfer, router_ms=costs.router_ms,
                     contention=costs.contention, decode_contention=costs.decode_contention)


def estimate(unit: Unit, costs: StepCosts, mix: Mix, s: SearchSettings) -> float:
    """A quick req/s estimate from the cost models alone (no queueing), to rank units and bound the
    bisection: prefill token rate over the mean prompt; the largest decode batch whose step meets the TPOT
    SLO, over the mean output; colocated: one GPU's time shared between both."""
    c = unit_costs(unit, costs, s)
    prompt, output = _mean(mix.prompt), _mean(mix.output)
    ctx = prompt + output // 2
    chunk = min(unit.budget, prompt)
    prefill_s = c.prefill.step_ms([(chunk, prompt - chunk)]) / chunk * prompt / 1e3  # one prompt, alone
    batch = max((b for b in range(1, s.max_num_seqs + 1)
                 if c.decode.step_ms(b, b * ctx) <= mix.slo.tpot * 1e3), default=1)
    decode_s = c.decode.step_ms(batch, batch * ctx) / batch * output / 1e3  # one answer's share of steps
    if unit.mode == "disagg":
        return min(unit.n_p / prefill_s, unit.n_d / decode_s)
    if unit.mode == "cond":  # every worker's time shared between both, as colocated but prefill whole
        return (unit.n_p + unit.n_d) / (prefill_s + decode_s)
    marginal_s = c.prefill.marginal_ms([(chunk, prompt - chunk)]) / chunk * prompt / 1e3
    return unit.n_d / (marginal_s + decode_s)


@dataclass(frozen=True)
class WorkBound:
    """GPU time one request of a mix needs at one TP, with nothing wasted: its prompt's prefill alone,
    its answer's share of the largest decode batch whose step meets the TPOT SLO. 1 / their sum bounds the
    goodput per GPU of any arrangement at that TP; with each role at its own best TP (`best_bound`), of any
    arrangement at all, so that bound / colocated bounds what disaggregation can gain."""
    tp: int
    prefill_ms: float  # GPU-ms (tp GPUs x wall ms) of the mean prompt
    decode_ms: float  # GPU-ms of the mean answer at `batch`
    batch: int

    @property
    def per_gpu(self) -> float:
        return 1e3 / (self.prefill_ms + self.decode_ms)


def work_bound(costs: StepCosts, mix: Mix, s: SearchSettings, tp: int = 1) -> WorkBound:
    c = costs.with_tp(tp, s.tp_efficiency)
    prompt, output = _mean(mix.prompt), _mean(mix.output)
    chunks = [(min(s.prefill_budget, prompt - done), done) for done in range(0, prompt, s.prefill_budget)]
    prefill = sum(c.prefill.step_ms([ch]) for ch in chunks)
    ctx = prompt + output // 2
    batch = max((b for b in range(1, s.max_num_seqs + 1)
                 if c.decode.step_ms(b, b * ctx) <= mix.slo.tpot * 1e3), default=1)
    decode = c.decode.step_ms(batch, batch * ctx) / batch * output
    return WorkBound(tp, prefill * tp, decode * tp, batch)


def best_bound(costs: StepCosts, mix: Mix, s: SearchSettings) -> tuple[WorkBound, WorkBound, float]:
    """The TP choice with the least prefill GPU-ms, the one with the least decode GPU-ms, and the per-GPU
    goodput no arrangement of the TP choices exceeds."""
    bounds = [work_bound(costs, mix, s, tp) for tp in s.tp_choices]
    p = min(bounds, key=lambda b: b.prefill_ms)
    d = min(bounds, key=lambda b: b.decode_ms)
    return p, d, 1e3 / (p.prefill_ms + d.decode_ms)


def unit_goodput(unit: Unit, costs: StepCosts, mix: Mix, s: SearchSettings) -> float:
    """Highest rate (req/s) where >= target of requests meet both SLOs, bisected as `pdserve bench --sweep`
    does, between bounds around the estimate (widened while the high end still passes)."""
    c = unit_costs(unit, costs, s)
    spec = ClusterSpec(unit.mode, prefill_workers=max(unit.n_p, 1), decode_workers=unit.n_d,
                       max_batch_tokens=unit.budget, max_num_seqs=s.max_num_seqs,
                       kv_capacity_tokens=s.kv_tokens_per_gpu * unit.tp_d, fused_max_slowdown=unit.fused)

    def attainment(rate: float) -> float:
        return summarize(simulate(spec, c, workload(mix, rate, s)), slo=mix.slo).slo_attainment or 0.0

    high = 1.25 * estimate(unit, costs, mix, s)
    for _ in range(4):
        found = find_goodput(attainment, high / 8, high, target=s.target, rel_tol=s.rel_tol, max_probes=8)
        if found.bound != "at_high":
            return found.rate
        high *= 4
    return found.rate


def _mean(d: LengthDist) -> int:
    return d.a if d.kind == "fixed" else (d.a + d.b) // 2 if d.kind == "uniform" else d.a


def candidate_units(gpus: int, s: SearchSettings) -> list[Unit]:
    """Every disaggregated split of a unit of min(gpus, unit_max_gpus) GPUs over the TP choices, and every
    colocated TP, chunk budget and split-fused credit."""
    size = min(gpus, s.unit_max_gpus)
    out = []
    for tp_p, tp_d in itertools.product(s.tp_choices, repeat=2):
        for n_p in range(1, size // tp_p + 1):
            rest = size - n_p * tp_p
            if rest >= tp_d and rest % tp_d == 0:
                out.append(Unit("disagg", n_p, tp_p, rest // tp_d, tp_d, s.prefill_budget))
    if s.conditional:
        out += [Unit("cond", u.n_p, u.tp_p, u.n_d, u.tp_d, u.budget, fused)
                for u in list(out) if u.tp_p == u.tp_d for fused in s.coloc_fused if fused]
    for tp, budget, fused in itertools.product(s.tp_choices, s.coloc_budgets, s.coloc_fused):
        if tp <= size:  # replicas are independent: one worker a unit
            out.append(Unit("coloc", 0, tp, 1, tp, budget, fused))
            if s.coloc_pooled and size // tp > 1:
                out.append(Unit("coloc", 0, tp, size // tp, tp, budget, fused))
    return out


def search(gpus: int, costs: StepCosts, mix: Mix, s: SearchSettings) -> dict[str, Found]:
    """The best disaggregated, conditional (with --cpu-units) and colocated unit by simulated goodput per GPU.
    Disaggregated splits are ranked by `estimate` and the top `simulate_top` simulated; the others all are."""
    units = candidate_units(gpus, s)
    disagg = sorted((u for u in units if u.mode == "disagg"),
                    key=lambda u: -estimate(u, costs, mix, s) / u.gpus)[:s.simulate_top]
    # Conditional splits all estimate alike (every worker shares both): each one is simulated.
    best: dict[str, Found] = {}
    for unit in disagg + [u for u in units if u.mode != "disagg"]:
        f = Found(unit, unit_goodput(unit, costs, mix, s))
        if unit.mode not in best or f.per_gpu > best[unit.mode].per_gpu:
            best[unit.mode] = f
    return best


@dataclass(frozen=True)
class Projection:
    gpus: int
    mix: str
    disagg: Found
    coloc: Found

    def cluster_goodput(self, f: Found) -> float:
        """G / unit replicas, each taking an equal Poisson share of the arrivals (still Poisson)."""
        return (self.gpus // f.unit.gpus) * f.goodput

    @property
    def gain(self) -> float:
        c = self.cluster_goodput(self.coloc)
        return self.cluster_goodput(self.disagg) / c if c else float("inf")


def project(gpu_counts: tuple[int, ...], costs: StepCosts, mixes: list[Mix], s: SearchSettings
            ) -> list[Projection]:
    out = []
    for mix in mixes:
        by_size: dict[int, dict[str, Found]] = {}
        for g in gpu_counts:
            size = min(g, s.unit_max_gpus)
            if size not in by_size:  # the same unit size gives the same search
                by_size[size] = search(g, costs, mix, s)
            best = by_size[size]
            out.append(Projection(g, mix.name, best["disagg"], best["coloc"]))
    return out
