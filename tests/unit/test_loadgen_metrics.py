"""pdserve bench's numbers on synthetic records: percentiles, SLO judgement, summaries, goodput bisection."""
from __future__ import annotations

import pytest

from bench.serving.client import CANCELLED_AT_STOP, RequestRecord
from bench.serving.goodput import find_goodput
from bench.serving.metrics import Slo, meets_slo, percentile, summarize


def record(i: int, ttft: float | None = 0.1, tpot: float | None = 0.01, status: str = "OK", e2e: float = 1.0,
           sent_at: float | None = None, warmup: bool = False, tokens: int = 10) -> RequestRecord:
    sent = float(i) if sent_at is None else sent_at
    return RequestRecord(index=i, warmup=warmup, sent_at=sent, status=status, prompt_tokens=5,
                         output_tokens=tokens, ttft=ttft, tpot=tpot, e2e=e2e, max_itl=tpot)


def test_percentile_interpolates_between_closest_ranks_like_numpy() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0]  # unsorted on purpose
    assert percentile(values, 50) == 3.0
    assert percentile(values, 90) == pytest.approx(4.6)
    assert percentile(values, 99) == pytest.approx(4.96)
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 5.0
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_percentiles_of_1_to_100_ms() -> None:
    s = summarize([record(i, ttft=(i + 1) / 1000) for i in range(100)])
    assert s.ttft_s["p50"] == pytest.approx(0.0505)
    assert s.ttft_s["p90"] == pytest.approx(0.0901)
    assert s.ttft_s["p99"] == pytest.approx(0.09901)
    assert s.ttft_s["mean"] == pytest.approx(0.0505)


def test_slo_needs_both_objectives_and_an_ok_status() -> None:
    slo = Slo(ttft=0.5, tpot=0.05)
    assert meets_slo(record(0, ttft=0.5, tpot=0.05), slo) is True  # the bound itself meets it
    assert meets_slo(record(0, ttft=0.6), slo) is False
    assert meets_slo(record(0, tpot=0.06), slo) is False
    assert meets_slo(record(0, tpot=None, tokens=1), slo) is True  # one token: no TPOT to miss
    assert meets_slo(record(0, status="RESOURCE_EXHAUSTED", ttft=None, tpot=None, e2e=0.01), slo) is False


def test_a_request_cut_by_the_hard_stop_counts_only_once_it_has_already_missed() -> None:
    slo = Slo(ttft=0.5, tpot=0.05)
    assert meets_slo(record(0, status=CANCELLED_AT_STOP, ttft=None, tpot=None, e2e=0.2), slo) is None
    assert meets_slo(record(0, status=CANCELLED_AT_STOP, ttft=None, tpot=None, e2e=0.9), slo) is False
    assert meets_slo(record(0, status=CANCELLED_AT_STOP, ttft=0.1, tpot=0.2), slo) is False
    assert meets_slo(record(0, status=CANCELLED_AT_STOP, ttft=0.1, tpot=0.01), slo) is None


def test_summary_leaves_out_warmup_counts_errors_by_status_and_rates_over_the_measured_window() -> None:
    records = [record(0, warmup=True, ttft=9.0),  # would dominate every percentile if counted
               record(1, sent_at=10.0, e2e=1.0),
               record(2, sent_at=11.0, e2e=1.0, ttft=0.9),
               record(3, sent_at=12.0, e2e=0.5, status="RESOURCE_EXHAUSTED", ttft=None, tpot=None, tokens=0),
               record(4, sent_at=13.0, e2e=2.0)]
    s = summarize(records, not_sent=3, slo=Slo(ttft=0.5, tpot=0.05))
    assert (s.requests, s.ok, s.not_sent) == (4, 3, 3)
    assert s.statuses == {"OK": 3, "RESOURCE_EXHAUSTED": 1}
    assert s.duration_s == pytest.approx(5.0)  # 10.0 -> 15.0
    assert s.request_throughput == pytest.approx(3 / 5)
    assert s.output_token_throughput == pytest.approx(30 / 5)
    assert s.ttft_s["p50"] == pytest.approx(0.1)  # OK requests only, warm-up excluded
    assert s.slo_attainment == pytest.approx(2 / 4) and s.slo_judged == 4


def test_summary_of_nothing_measured_is_empty_not_an_error() -> None:
    s = summarize([record(0, warmup=True)], slo=Slo(1.0, 1.0))
    assert s.requests == 0 and s.ttft_s is None and s.slo_attainment is None and s.request_throughput == 0.0


def test_bisection_brackets_the_rate_where_a_monotone_attainment_crosses_the_target() -> None:
    knee = 3.7
    result = find_goodput(lambda r: 0.95 if r <= knee else 0.6, low=0.5, high=16.0, target=0.9, rel_tol=0.05,
                          max_probes=20)
    assert result.bound == "bisected"
    assert knee * 0.95 <= result.rate <= knee
    failing_above = min(p.rate for p in result.probes if p.attainment < 0.9)
    assert failing_above - result.rate <= 0.05 * failing_above


def test_bisection_stops_at_max_probes_and_reports_the_edges() -> None:
    result = find_goodput(lambda r: 1.0 - r / 100, low=1.0, high=64.0, target=0.9, rel_tol=1e-9, max_probes=5)
    assert len(result.probes) == 5 and result.rate <= 10.0
    assert [p.rate for p in result.probes[:2]] == [1.0, 64.0]
    assert find_goodput(lambda r: 0.5, 1.0, 8.0).bound == "below_low"
    assert find_goodput(lambda r: 0.5, 1.0, 8.0).rate == 0.0
    high = find_goodput(lambda r: 1.0, 1.0, 8.0)
    assert (high.bound, high.rate, len(high.probes)) == ("at_high", 8.0, 2)
    with pytest.raises(ValueError):
        find_goodput(lambda r: 1.0, 2.0, 1.0)
