"""The simulator's event loop: router admission and dispatch, prefill/decode/colocated workers, KV moves."""
from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from bench.serving.client import RequestRecord
from bench.serving.sim_costs import StepCosts
from bench.serving.sim_placement import SimPlacement
from bench.serving.sim_spread import SpreadWalk
from engine.step_cost import StepCostModel

MODES = ("disagg", "coloc", "cond")


@dataclass(frozen=True)
class SimRequest:
    arrival: float  # seconds from the run's start
    prompt: int
    output: int
    warmup: bool = False
    prefix: tuple[int, int] | None = None  # (shared system prompt's id, its tokens): what a cache reuses


@dataclass(frozen=True)
class ClusterSpec:
    """disagg: prefill_workers + decode_workers; coloc: decode_workers workers that prefill and decode
    (one scheduler: decode tokens first, then prefill chunks under the same budget, as the engine does);
    cond: prefill_workers + decode_workers that also prefill the prompts router/placement.py's `cost`
    policy places on them (`pdserve up --prefill-placement cost`, the default)."""
    mode: str
    prefill_workers: int = 1
    decode_workers: int = 1
    max_batch_tokens: int = 512  # engine/config.py's default token budget per step
    max_num_seqs: int = 32  # decode batch cap; more reserved sequences wait for a slot
    kv_capacity_tokens: int = 8192  # per decode-capable worker (512 blocks x 16 tokens by default)
    # The engine's scheduler policies (engine/config.py; 0 = off, as when the CPU runs were measured).
    # Fair prefill: while others run or wait, a prompt with more than this many tokens left computes at most
    # this many a step, and a new long prompt waits while max_long_partial_prefills long ones progress.
    long_prefill_threshold: int = 0
    max_long_partial_prefills: int = 1
    # Split-fused time credit (engine/config.py's fused_step_max_slowdown): with decodes running, a colocated
    # worker's prefill tokens are what the engine's own StepCostModel (engine/step_cost.py) grants, fed
    # the sim's step costs as the steps it timed, so the batch's mean step stays within this many times its
    # decode-only step.
    fused_max_slowdown: float = 0.0
    # Prefix cache (engine/prefix_cache.py): a worker reuses the full blocks of a shared prefix it computed
    # or received before, up to the block holding the prompt's last token; a prefill worker skips computing
    # them and sends only what the decode worker does not hold. No eviction: the runs' prefixes fit.
    prefix_caching: bool = False
    block_size: int = 16

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r}: expected one of {', '.join(MODES)}")
        if self.fused_max_slowdown and self.fused_max_slowdown <= 1.0:
            raise ValueError(f"fused_max_slowdown must be 0 (off) or > 1, got {self.fused_max_slowdown}")
        if self.decode_workers < 1 or (self.mode != "coloc" and self.prefill_workers < 1):
            raise ValueError("a cluster needs at least one worker of each role it uses")


@dataclass(eq=False)
class _Req:
    index: int
    req: SimRequest
    computed: int = 0  # prompt tokens prefilled so far, cached ones included
    hit: int | None = None  # prompt tokens the prefix cache gave it (None: not admitted to a step yet)
    first: float | None = None
    last: float | None = None
    end: float | None = None
    finish_step: int = 0
    decode_worker: _Worker | None = None
    dispatched: float = 0.0
    prefill_start: float | None = None  # on a prefill worker: its first chunk's step started
    prefill_s: float = 0.0  # on a prefill worker: first chunk started -> last computed, and the exposed
    exposed_s: float = 0.0  # transfer after it (what the router's placement learns from)


@dataclass(eq=False)
class _Worker:
    role: str  # "prefill", "decode" or "coloc"
    index: int
    busy: bool = False
    queue: deque[_Req] = field(default_factory=deque)  # prompts to prefill, FCFS
    queued_tokens: int = 0
    pending: deque[_Req] = field(default_factory=deque)  # KV arrived (or reserved, coloc) awaiting a slot
    active: int = 0  # sequences in the decode batch
    ctx_sum: int = 0  # their context lengths
    steps: int = 0  # decode steps completed
    finishing: list[tuple[int, int, _Req]] = field(default_factory=list)  # (step, index, req) heap
    kv_used: int = 0
    assigned: int = 0  # requests dispatched here and not finished
    # the running step, for the shared host's processor sharing (StepCosts.contention)
    started: float = 0.0
    work_ms: float = 0.0  # what is left of it at full speed
    slowdown: float = 1.0  # its current rate is 1 / slowdown
    since: float = 0.0  # when work_ms and slowdown were last set
    step_id: int = 0  # end events of an older id were superseded by a reschedule
    chunks: list[tuple[_Req, int]] = field(default_factory=list)  # the running step's prefill chunks
    step_batch: int = 0  # the running step's decode tokens
    step_cost: StepCostModel | None = None  # the split-fused time credit (a colocated worker, when on)
    cached: dict[int, int] = field(default_factory=dict)  # prefix id -> its tokens held in full blocks
    awaiting: int = 0  # requests dispatched here whose KV is still on a prefill worker or in flight

    def waiting_local(self) -> tuple[int, int]:
        """(sequences the engine would count running beyond the batch: local prompts it started, prefilled
        or landed ones awaiting a step; local prompts not started): what placement reads."""
        started = sum(1 for r in self.queue if r.hit is not None)
        return started + len(self.pending), len(self.queue) - started


class Simulation:
    """One run: feed requests, call run(), read records. Reproducible: ties break by insertion order, and
    the step spread (StepCosts.prefill_spread / decode_spread) is drawn from a generator seeded by `seed`."""

    def __init__(self, spec: ClusterSpec, costs: StepCosts, requests: Sequence[SimRequest],
                 seed: int = 0) -> None:
        self.spec, self.costs = spec, costs
        self._walk = SpreadWalk(seed)
        need = max((r.prompt + r.output for r in requests), default=0)
        if need > spec.kv_capacity_tokens:
            raise ValueError(f"a request needs {need} KV tokens; a worker holds {spec.kv_capacity_tokens}")
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[..., None], tuple]] = []
        self._seq = 0
        role = "decode" if spec.mode == "disagg" else "coloc"  # cond: decode workers prefill too
        self.decoders = [_Worker(role, i) for i in range(spec.decode_workers)]
        if role == "coloc" and spec.fused_max_slowdown:  # the only role here whose steps fuse prefill
            for w in self.decoders:
                w.step_cost = StepCostModel(spec.fused_max_slowdown)
        self.prefillers = ([_Worker("prefill", i) for i in range(spec.prefill_workers)]
                           if spec.mode != "coloc" else [])
        self.placement: SimPlacement | None = None
        self.placements: dict[str, int] = {}  # "where/reason" -> prompts, as the router's metric counts
        if spec.mode == "cond":
            self.placement = SimPlacement()
            if requests:  # a cluster warmed by earlier probes: the policy has measured remote prefills
                n = round(sum(r.prompt for r in requests) / len(requests))
                prefill_ms = costs.prefill.step_ms([(n, 0)])
                self.placement.warm(n, prefill_ms / 1e3, costs.transfer.exposed_ms(n, prefill_ms) / 1e3, 0.0)
        self.workers = self.prefillers + self.decoders
        self.reqs = [_Req(i, r) for i, r in enumerate(requests)]
        self._waiting: deque[_Req] = deque()  # admitted, no decode worker has KV room yet
        for r in self.reqs:
            self._at(r.req.arrival + costs.path_ms(r.index) / 1e3, self._arrive, r)

    def _at(self, t: float, fn: Callable[..., None], *args) -> None:
        heapq.heappush(self._heap, (t, self._seq, fn, args))
        self._seq += 1

    def run(self) -> list[RequestRecord]:
        while self._heap:
            self.now, _, fn, args = heapq.heappop(self._heap)
            fn(*args)
        return [self._record(r) for r in self.reqs]

    @staticmethod
    def _record(r: _Req) -> RequestRecord:
        q = r.req
        n = q.output
        return RequestRecord(
            index=r.index, warmup=q.warmup, sent_at=q.arrival, status="OK", prompt_tokens=q.prompt,
            output_tokens=n, ttft=r.first - q.arrival,
            tpot=(r.last - r.first) / (n - 1) if n > 1 else None, e2e=r.end - q.arrival, max_itl=None)

    # --- router: FCFS admission, least-loaded dispatch (router/dispatch.py's order) ---
    def _arrive(self, r: _Req) -> None:
        self._waiting.append(r)
        self._dispatch()

    def _dispatch(self) -> None:
        cap = self.spec.kv_capacity_tokens
        while self._waiting:
            r = self._waiting[0]
            need = r.req.prompt + r.req.output
            fits = [w for w in self.decoders if cap - w.kv_used >= need]
            if not fits:
                return  # head of line waits for a finish to free KV
            self._waiting.popleft()
            d = min(fits, key=lambda w: (w.kv_used, w.assigned, w.index))
            d.kv_used += need
            d.assigned += 1
            r.decode_worker, r.dispatched = d, self.now
            if self.spec.mode == "coloc" or self._local(r):
                p = d
            else:
                p = min(self.prefillers, key=lambda w: (w.queued_tokens, len(w.queue), w.index))
                d.awaiting += 1
            p.queue.append(r)
            p.queued_tokens += r.req.prompt
            self._kick(p)

    def _local(self, r: _Req) -> bool:
        """Conditional placement's decision for r (counted as the router's metric counts it)."""
        if self.placement is None:
            return False
        placed = self.placement.place(r.req.prompt, self.prefillers, self.decoders)
        key = f"{placed.where}/{placed.reason}"
        self.placements[key] = self.placements.get(key, 0) + 1
        return placed.local

    # --- workers: a step starts when idle and there is work; its cost comes from the cost models ---
    def _kick(self, w: _Worker) -> None:
        if w.busy:
            return
        if w.role != "prefill":
            self._activate(w)
        batch, c = w.active, self.costs
        budget = self.spec.max_batch_tokens - batch
        if batch and w.step_cost and w.queue:  # the scheduler's split-fused rule (engine/scheduler.py)
            pending = sum(r.req.prompt - r.computed for r in w.queue)
            budget = min(budget, w.step_cost.prefill_cap(batch, pending))
        chunks = self._chunks(w, budget) if w.role != "decode" else []
        if not batch and not chunks:
            return
        for r, _ in chunks:
            if w.role == "prefill" and r.prefill_start is None:
                r.prefill_start = self.now
        ms = c.prefill.step_ms([(n, r.computed) for r, n in chunks]) if chunks else 0.0
        if batch:
            ms = c.decode.step_ms(batch, w.ctx_sum) + (c.prefill.marginal_ms(
                [(n, r.computed) for r, n in chunks]) if chunks else 0.0)
        kind = "decode" if batch else "prefill"  # a step with decodes in it varies as they do
        spread = c.decode_spread if batch else c.prefill_spread
        if spread:
            ms *= self._walk.factor(spread, (w.role, w.index, kind))
        w.busy, w.chunks, w.step_batch, w.work_ms, w.slowdown = True, chunks, batch, ms, 1.0
        w.started = w.since = self.now
        if c.shares_host:
            self._share_host()
        else:
            self._at(self.now + ms / 1e3, self._end_step, w, chunks, w.step_id)

    def _share_host(self) -> None:
        """Processor sharing on one host: while k workers compute, each step progresses at
        1 / (1 + contention * (k - 1)) of its full speed. Called whenever a step starts or ends, so a step
        pays for exactly the overlap it had, not for the busy set at its start."""
        busy = [w for w in self.workers if w.busy]
        for w in busy:
            slowdown = 1 + self.costs.contention_of(w.role) * (len(busy) - 1)
            w.work_ms -= (self.now - w.since) * 1e3 / w.slowdown
            w.since, w.slowdown = self.now, slowdown
            w.step_id += 1
            self._at(self.now + max(w.work_ms, 0.0) * slowdown / 1e3, self._end_step, w, w.chunks, w.step_id)

    def _chunks(self, w: _Worker, budget: int) -> list[tuple[_Req, int]]:
        """FCFS chunks under the budget (partial prompts are older, so first), with fair prefill's caps."""
        threshold, out = self.spec.long_prefill_threshold, []
        contended = len(w.queue) + w.active + len(w.pending) > 1
        long_partials = sum(1 for r in w.queue if r.hit is not None and r.computed > r.hit
                            and 0 < threshold < r.req.prompt - r.computed)
        for r in w.queue:
            if budget <= 0:
                break
            if r.hit is None:  # admitted: the engine matches its cached blocks now
                r.hit = r.computed = self._cache_hit(w, r)
                w.queued_tokens -= r.hit
            left = r.req.prompt - r.computed
            is_long = 0 < threshold < left
            if is_long and r.computed == r.hit:
                if long_partials >= self.spec.max_long_partial_prefills:
                    continue  # waits; shorter prompts behind it start
                long_partials += 1
            n = min(left, budget, threshold if contended and is_long else left)
            out.append((r, n))
            budget -= n
        return out

    def _cache_hit(self, w: _Worker, r: _Req) -> int:
        """Prompt tokens w holds for r: its prefix's cached full blocks, never the block of the last token."""
        if not (self.spec.prefix_caching and r.req.prefix):
            return 0
        reusable = (r.req.prompt - 1) // self.spec.block_size * self.spec.block_size
        return min(w.cached.get(r.req.prefix[0], 0), reusable)

    def _cache(self, w: _Worker, r: _Req, computed: int) -> None:
        """w now holds r's first `computed` prompt tokens: its prefix's full blocks among them are named."""
        if self.spec.prefix_caching and r.req.prefix:
            key, n = r.req.prefix
            full = min(computed, n) // self.spec.block_size * self.spec.block_size
            w.cached[key] = max(w.cached.get(key, 0), full)

    def _activate(self, w: _Worker) -> None:
        """At a step boundary: sequences whose KV arrived join the batch; the first token goes out now
        (decode_worker/service.py pushes the prefill's token when its engine thread activates it)."""
        while w.pending and w.active < self.spec.max_num_seqs:
            self._join(w, w.pending.popleft())

    def _join(self, w: _Worker, r: _Req) -> None:
        if r.first is None:
            r.first = r.last = self.now
        if r.req.output <= 1:
            self._at(self.now, self._finish, w, r)  # not inline: finishing dispatches, which may kick w
            return
        w.active += 1
        w.ctx_sum += r.req.prompt + 1
        r.finish_step = w.steps + r.req.output - 1
        heapq.heappush(w.finishing, (r.finish_step, r.index, r))

    def _end_step(self, w: _Worker, chunks: list[tuple[_Req, int]], step_id: int) -> None:
        if step_id != w.step_id or not w.busy:
            return  # superseded: the host's sharing changed and the end was rescheduled
        w.step_id += 1
        ms = (self.now - w.started) * 1e3  # as it ran, slowed or not: what the KV stream overlapped
        if w.step_cost:  # the engine times schedule -> postprocess: the step as it ran, slowed or not
            w.step_cost.observe(w.step_batch, sum(n for _, n in chunks), ms / 1e3)
        if w.active:
            w.steps += 1
            w.ctx_sum += w.active
            while w.finishing and w.finishing[0][0] <= w.steps:
                _, _, r = heapq.heappop(w.finishing)
                r.last = self.now
                w.active -= 1
                w.ctx_sum -= r.req.prompt + r.req.output
                self._finish(w, r)
        for r, n in chunks:
            r.computed += n
            w.queued_tokens -= n
            self._cache(w, r, r.computed)
            if r.computed == r.req.prompt:
                w.queue.remove(r)
                if w.role == "coloc":
                    r.first = r.last = self.now  # its first token was sampled in this step
                    w.pending.append(r)
                else:  # only the part the decode worker lacks travels (the transfer's start offset)
                    sent = r.req.prompt - self._cache_hit(r.decode_worker, r)
                    exposed = self.costs.transfer.exposed_ms(sent, ms)
                    r.prefill_s, r.exposed_s = self.now - r.prefill_start, exposed / 1e3
                    self._at(self.now + exposed / 1e3, self._kv_arrived, r)
        # Busy until here so that a dispatch triggered above cannot start a second step on this worker.
        w.busy = False
        self._kick(w)
        if self.costs.shares_host and not w.busy:
            self._share_host()  # one fewer busy worker: the others speed up

    def _kv_arrived(self, r: _Req) -> None:
        d = r.decode_worker
        d.awaiting -= 1
        if self.placement is not None:
            self.placement.observe(r.req.prompt, r.prefill_s, r.exposed_s, self.now - r.dispatched)
        self._cache(d, r, r.req.prompt)
        d.pending.append(r)
        self._kick(d)

    def _finish(self, w: _Worker, r: _Req) -> None:
        r.end = self.now
        w.kv_used -= r.req.prompt + r.req.output
        w.assigned -= 1
        self._dispatch()


def simulate(spec: ClusterSpec, costs: StepCosts, requests: Sequence[SimRequest],
             seed: int = 0) -> list[RequestRecord]:
    """Runs every request to its end and returns one harness-shaped record each (status OK)."""
    return Simulation(spec, costs, requests, seed).run()
