"""Request records into the report's numbers: percentiles, throughput, errors by status, SLO attainment."""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from bench.serving.client import CANCELLED_AT_STOP, RequestRecord

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Slo:
    ttft: float  # seconds
    tpot: float  # seconds per output token after the first


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); values need not be sorted."""
    if not values:
        raise ValueError("percentile of no values")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def distribution(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    out = {f"p{q}": percentile(values, q) for q in PERCENTILES}
    out["mean"] = sum(values) / len(values)
    return out


def meets_slo(r: RequestRecord, slo: Slo) -> bool | None:
    """True/False; None when the hard stop cut the request before it could be judged either way."""
    late_first = (r.ttft is None and r.e2e > slo.ttft) or (r.ttft is not None and r.ttft > slo.ttft)
    slow = r.tpot is not None and r.tpot > slo.tpot
    if r.status == CANCELLED_AT_STOP:
        return False if late_first or slow else None
    return r.status == "OK" and not late_first and not slow


@dataclass(frozen=True)
class Summary:
    requests: int  # measured (warm-up excluded) requests that were sent
    ok: int
    statuses: dict[str, int]
    not_sent: int
    duration_s: float  # first measured send to last measured end
    request_throughput: float  # OK requests/s over duration_s
    output_token_throughput: float  # streamed tokens/s over duration_s (all measured requests)
    ttft_s: dict[str, float] | None
    tpot_s: dict[str, float] | None
    e2e_s: dict[str, float] | None
    slo: Slo | None
    slo_attainment: float | None  # met / judged
    slo_judged: int

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(records: Sequence[RequestRecord], not_sent: int = 0, slo: Slo | None = None) -> Summary:
    """Stats over the non-warm-up records; latency percentiles over OK requests only."""
    measured = [r for r in records if not r.warmup]
    ok = [r for r in measured if r.status == "OK"]
    if measured:
        start = min(r.sent_at for r in measured)
        duration = max(r.sent_at + r.e2e for r in measured) - start
    else:
        duration = 0.0
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    judged = [m for m in (meets_slo(r, slo) for r in measured) if m is not None] if slo else []
    return Summary(
        requests=len(measured), ok=len(ok), statuses=dict(Counter(r.status for r in measured)),
        not_sent=not_sent, duration_s=duration, request_throughput=per_s(len(ok)),
        output_token_throughput=per_s(sum(r.output_tokens for r in measured)),
        ttft_s=distribution([r.ttft for r in ok if r.ttft is not None]),
        tpot_s=distribution([r.tpot for r in ok if r.tpot is not None]),
        e2e_s=distribution([r.e2e for r in ok]),
        slo=slo, slo_attainment=sum(judged) / len(judged) if judged else None, slo_judged=len(judged))
