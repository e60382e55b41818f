"""SLOs from single requests (`pdserve bench compare --slo-scale`): parsing the multiples, measuring lone
requests against a fake server with known TTFT/TPOT, and which objective the misses broke."""
from __future__ import annotations

from dataclasses import asdict

import pytest

from bench.serving.client import CANCELLED_AT_STOP, RequestRecord
from bench.serving.compare import format_misses
from bench.serving.metrics import Slo
from bench.serving.slo_rule import (
    SingleRequestCosts,
    SloMisses,
    SloScale,
    measure_single_requests,
    slo_misses,
)
from bench.serving.workload import BenchRequest
from tests.unit.test_loadgen_client import TPOT, TTFT, FakeServer, fake_server  # noqa: F401  (the fixture)


def test_scale_parses_two_positive_multiples() -> None:
    assert SloScale.parse("4:2.5") == SloScale(4.0, 2.5)


@pytest.mark.parametrize("text", ["4", "4:", "a:2", "0:2", "3:-1"])
def test_scale_refuses_anything_but_two_positive_multiples(text: str) -> None:
    with pytest.raises(ValueError, match="expected TTFT_X:TPOT_X"):
        SloScale.parse(text)


def test_slo_is_the_multiples_of_the_single_request_costs() -> None:
    slo = SingleRequestCosts(ttft_s=0.8, tpot_s=0.05, requests=4).slo(SloScale(3, 2))
    assert slo == Slo(ttft=pytest.approx(2.4), tpot=pytest.approx(0.1))


def test_single_requests_measure_the_servers_own_ttft_and_tpot(fake_server: FakeServer) -> None:  # noqa: F811
    requests = [BenchRequest(max_tokens=5, prompt_ids=(1, 2, 3))] * 3
    costs = measure_single_requests(fake_server.address, requests, warmup=1)
    assert costs.requests == 2
    assert TTFT - 0.005 <= costs.ttft_s <= TTFT + 0.1
    assert TPOT - 0.005 <= costs.tpot_s <= TPOT + 0.03


def record(index: int, ttft: float | None, tpot: float | None, status: str = "OK", warmup: bool = False,
           e2e: float = 3.0) -> dict:
    return asdict(RequestRecord(index=index, warmup=warmup, sent_at=0.0, status=status, prompt_tokens=8,
                                output_tokens=4, ttft=ttft, tpot=tpot, e2e=e2e, max_itl=None))


def test_misses_say_which_objective_broke() -> None:
    slo = Slo(ttft=1.0, tpot=0.1)
    records = [record(0, 5.0, 5.0, warmup=True),  # warm-up: not judged
               record(1, 0.5, 0.05),  # met
               record(2, 2.0, 0.05),  # late first token
               record(3, 0.5, 0.2), record(4, 0.5, 0.3),  # slow decode
               record(5, 2.0, 0.2),  # both
               record(6, 0.5, 0.05, status="UNAVAILABLE"),  # failed within both
               record(7, None, None, status=CANCELLED_AT_STOP, e2e=0.5)]  # cut before it missed: not judged
    assert slo_misses(records, slo) == SloMisses(judged=6, ttft_only=1, tpot_only=2, both=1, failed=1)


def test_comparison_prints_each_probes_misses() -> None:
    slo = Slo(ttft=1.0, tpot=0.1)
    summary = {"slo": asdict(slo), "slo_attainment": 0.5, "request_throughput": 0.4}
    probe = {"rate": 0.5, "summary": summary, "records": [record(0, 0.5, 0.05), record(1, 0.5, 0.2)]}
    result = {"label": "disagg", "sweep": {"probes": [probe]}, "run": None}
    assert format_misses([result]) == ("disagg at 0.500 req/s (served 0.40): 50% within SLO; missed TTFT "
                                       "only 0, TPOT only 1, both 0, failed 0 of 2 judged")
