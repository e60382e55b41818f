"""`pdserve bench compare`'s table: one row per configuration and each one's ratios to the first."""
from __future__ import annotations

from bench.serving.compare import format_comparison


def result(label: str, goodput: float, ttft_p50: float, tpot_p99: float) -> dict:
    summary = {"request_throughput": 0.5, "output_token_throughput": 8.0, "slo_attainment": 1.0,
               "ttft_s": {"p50": ttft_p50, "p99": 2 * ttft_p50},
               "tpot_s": {"p50": tpot_p99 / 2, "p99": tpot_p99}}
    probes = [{"rate": goodput, "summary": summary}, {"rate": 2 * goodput, "summary": {}}]
    sweep = {"goodput_rps": goodput, "bound": "bisected", "probes": probes}
    return {"label": label, "run": None, "sweep": sweep, "prefix_cache_hit_ratio": {"decode-0": 0.5}}


def test_each_configuration_gets_a_row_and_its_ratios_to_the_first():
    results = [result("colocated", 0.4, 2.0, 0.1), result("disagg", 0.6, 1.0, 0.05)]
    lines = format_comparison(results).splitlines()
    assert lines[2] == "| colocated | 0.400 | 0.50 | 8.0 | 2000 / 4000 | 50 / 100 | 100% | decode-0 0.50 |"
    assert lines[3].startswith("| disagg | 0.600 | 0.50 | 8.0 | 1000 / 2000 | 25 / 50 |")
    assert lines[4] == "disagg / colocated: goodput 1.50x, TTFT p50 0.50x, TPOT p99 0.50x"


def test_placement_counts_are_read_from_the_routers_metrics_text():
    from prometheus_client import generate_latest

    from bench.serving.compare import placements
    from router.metrics import RouterMetrics

    metrics = RouterMetrics()
    for where, reason in (("local", "cheaper"), ("local", "cheaper"), ("remote", "cheaper")):
        metrics.prefill_placed(where, reason)
    assert placements(generate_latest(metrics.registry).decode()) == {"local/cheaper": 2, "remote/cheaper": 1}
