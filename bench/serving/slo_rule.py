"""SLOs the DistServe way: multiples of a lone request's TTFT and TPOT, measured on the cluster under test."""
from __future__ import annotations

import asyncio
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from bench.serving.client import RequestRecord, RunLimits, run_load
from bench.serving.metrics import Slo, meets_slo
from bench.serving.workload import BenchRequest


@dataclass(frozen=True)
class SloScale:
    """TTFT SLO = ttft_x x a lone request's TTFT; TPOT SLO = tpot_x x a lone request's TPOT (pure decode)."""
    ttft_x: float
    tpot_x: float

    @classmethod
    def parse(cls, text: str) -> SloScale:
        ttft, sep, tpot = text.partition(":")
        try:
            scale = cls(float(ttft), float(tpot)) if sep else None
        except ValueError:
            scale = None
        if scale is None or not (scale.ttft_x > 0 and scale.tpot_x > 0):
            raise ValueError(f"expected TTFT_X:TPOT_X (multiples > 0), got {text!r}")
        return scale


@dataclass(frozen=True)
class SingleRequestCosts:
    """Medians over requests sent one at a time (each after the last one ended): no queue, no batch."""
    ttft_s: float  # the prompt's prefill, plus the hop to the first token
    tpot_s: float  # one decode step of a batch of one
    requests: int

    def slo(self, scale: SloScale) -> Slo:
        return Slo(ttft=scale.ttft_x * self.ttft_s, tpot=scale.tpot_x * self.tpot_s)


def measure_single_requests(address: str, requests: Sequence[BenchRequest], warmup: int = 1,
                            max_seconds: float = 120.0) -> SingleRequestCosts:
    """Sends the requests one at a time; the first `warmup` are left out (first-use costs)."""
    if len(requests) <= warmup:
        raise ValueError(f"need more than {warmup} requests to measure, got {len(requests)}")
    measured: list[RequestRecord] = []
    for i, req in enumerate(requests):
        result = asyncio.run(run_load(address, [0.0], [req], RunLimits(max_seconds=max_seconds,
                                                                         progress=False)))
        record = result.records[0] if result.records else None
        if record is None or record.status != "OK" or record.ttft is None or record.tpot is None:
            raise RuntimeError(f"single request {i} did not complete: {record}")
        if i >= warmup:
            measured.append(record)
    return SingleRequestCosts(ttft_s=statistics.median(r.ttft for r in measured),
                              tpot_s=statistics.median(r.tpot for r in measured), requests=len(measured))


@dataclass(frozen=True)
class SloMisses:
    """Which objective the judged requests missed (as metrics.meets_slo judges them): the one that binds."""
    judged: int
    ttft_only: int
    tpot_only: int
    both: int
    failed: int  # ended with an error while within both objectives so far

    def describe(self) -> str:
        return (f"missed TTFT only {self.ttft_only}, TPOT only {self.tpot_only}, both {self.both}, "
                f"failed {self.failed} of {self.judged} judged")


def slo_misses(records: Sequence[dict], slo: Slo) -> SloMisses:
    """records: RequestRecord dicts (the harness's JSON); warm-up requests and those the hard stop cut before
    they missed are left out, as in the attainment."""
    counts = {"judged": 0, "ttft_only": 0, "tpot_only": 0, "both": 0, "failed": 0}
    for fields in records:
        r = RequestRecord(**fields)
        verdict = None if r.warmup else meets_slo(r, slo)
        if verdict is None:
            continue
        counts["judged"] += 1
        late = r.e2e > slo.ttft if r.ttft is None else r.ttft > slo.ttft
        slow = r.tpot is not None and r.tpot > slo.tpot
        if not verdict:
            key = "both" if late and slow else "ttft_only" if late else "tpot_only" if slow else "failed"
            counts[key] += 1
    return SloMisses(**counts)
