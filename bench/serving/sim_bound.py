"""Capacity bounds of colocated, pure and conditional disaggregation on N one-core workers from step costs."""
from __future__ import annotations

from dataclasses import dataclass

from bench.serving.sim_costs import StepCosts
from bench.serving.sim_search import Mix
from bench.serving.workload import LengthDist


@dataclass(frozen=True)
class RequestWork:
    """Worker-seconds one request of a mix needs, from the step costs alone (no queueing, no host sharing):
    its prompt's prefill in one step (the mean over the mix's lengths), and its answer's decode steps at a
    batch of b (each step's time split over the b streams it serves)."""
    prefill_s: float
    output_tokens: float
    costs: StepCosts
    context: int  # a stream's mean context while it decodes

    def decode_s(self, batch: float) -> float:
        step = self.costs.decode.step_ms(batch, batch * self.context) / 1e3  # type: ignore[arg-type]
        return (self.output_tokens - 1) * step / batch

    def batch_at(self, rate: float, cap: int) -> float:
        """The mean decode batch `rate` req/s keep on one worker (Little's law: streams = rate x an answer's
        decode time, which grows with the batch), at least 1 while it decodes, at most `cap`."""
        b = 1.0
        for _ in range(100):
            b = min(cap, max(1.0, rate * self.decode_s(b) * b))
        return b

    def fused_decode_s(self) -> float:
        """The answer's decode tokens riding in steps that prefill anyway: the decode step's fixed part is
        paid by the prefill (the least a colocated worker can spend on decode)."""
        return (self.output_tokens - 1) * (self.costs.decode.per_seq_ms + self.costs.decode.per_ctx_token_ms
                                           * self.context) / 1e3

    def max_batch(self, tpot_s: float, cap: int = 32) -> int:
        """The largest decode batch whose decode-only step meets a TPOT SLO (1 if none does)."""
        return max((b for b in range(1, cap + 1)
                    if self.costs.decode.step_ms(b, b * self.context) / 1e3 <= tpot_s), default=1)


def _lengths(d: LengthDist) -> list[int]:
    if d.kind == "fixed":
        return [d.a]
    if d.kind == "uniform":
        return list(range(d.a, d.b + 1))
    raise ValueError(f"bound: a {d.kind} length distribution is not supported (fixed or uniform)")


def request_work(costs: StepCosts, mix: Mix) -> RequestWork:
    prompts, outputs = _lengths(mix.prompt), _lengths(mix.output)
    prefill_s = sum(costs.prefill.step_ms([(n, 0)]) for n in prompts) / len(prompts) / 1e3
    out = sum(outputs) / len(outputs)
    return RequestWork(prefill_s, out, costs, round(sum(prompts) / len(prompts) + out / 2))


@dataclass(frozen=True)
class Bound:
    config: str
    req_per_s: float
    why: str


def bounds(work: RequestWork, tpot_s: float, workers: int = 2, speed: float = 1.0) -> list[Bound]:
    """Req/s no arrangement of `workers` one-core workers exceeds, each worker running at `speed` of the
    engine alone (what the router, client, Ray and the neighbour's contention leave it). Colocated: every
    worker does both, between decoding on its own (batch 1: a few streams spread over all workers) and its
    decode tokens riding free in prefill steps; 1P+(N-1)D: the prefill worker alone; conditional
    (N-1 decode workers take prompts too): every worker's time, all streams decoding at the largest batch
    the TPOT SLO allows."""
    p, b = work.prefill_s, work.max_batch(tpot_s)
    d1, dfused, db = work.decode_s(1), work.fused_decode_s(), work.decode_s(b)
    n = workers * speed
    return [
        Bound("colocated, decode alone at batch 1", n / (p + d1), f"{p:.3f} + {d1:.3f} s a request"),
        Bound("colocated, decode fused into prefill steps", n / (p + dfused),
              f"{p:.3f} + {dfused:.3f} s a request"),
        Bound(f"1P+{workers - 1}D", min(speed / p, (n - speed) / db),
              f"prefill {p:.3f} s a request on one worker"),
        Bound(f"conditional, decode at batch {b} (the TPOT SLO's largest)", n / (p + db),
              f"{p:.3f} + {db:.3f} s a request"),
        _conditional_at_its_rate(work, n, b),
    ]


def _conditional_at_its_rate(work: RequestWork, n: float, cap: int) -> Bound:
    """Conditional with the decode batch its own bound's rate sustains: rate = n / (p + d(batch)) and
    batch = the batch that rate keeps (RequestWork.batch_at), iterated to their fixed point."""
    rate = n / (work.prefill_s + work.decode_s(1))
    for _ in range(100):
        rate = n / (work.prefill_s + work.decode_s(work.batch_at(rate, cap)))
    b = work.batch_at(rate, cap)
    return Bound(f"conditional, decode at the batch its rate keeps ({b:.2f})", rate,
                 f"{work.prefill_s:.3f} + {work.decode_s(b):.3f} s a request")
