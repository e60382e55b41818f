"""The simulator's model pieces on hand-checked cases: host sharing, path spread, policies, crossval."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pytest

from bench.serving.client import RequestRecord
from bench.serving.metrics import Slo, summarize
from bench.serving.sim import main
from bench.serving.sim_calibrate import Grid
from bench.serving.sim_costs import DecodeCost, PrefillCost, StepCosts, TransferCost, save_costs
from bench.serving.sim_crossval import crossval, format_crossval
from bench.serving.sim_events import ClusterSpec, SimRequest, simulate
from bench.serving.sim_fit import Obs, residuals_ms
from bench.serving.sim_validate import CPU_CLUSTER, noise_band

FREE_LINK = TransferCost(1, 1, 1e9)  # a nanosecond-scale exposed transfer


def test_a_step_is_slowed_only_while_another_worker_computes_beside_it() -> None:
    costs = StepCosts(PrefillCost(100.0, 0.0), DecodeCost(10.0, 0.0), FREE_LINK, contention=1.0)
    a, b = simulate(ClusterSpec("disagg"), costs, [SimRequest(0.0, 1, 2), SimRequest(0.105, 1, 1)])
    # a's one decode step runs 0.100-0.105 alone (5 of its 10 ms), then beside b's prefill at half speed:
    # the other 5 ms take 10, so it ends at 0.115 (a start-time multiplier would have said 0.110).
    assert a.tpot == pytest.approx(0.015)
    # b's prefill does 5 ms of work by 0.115, then the other 95 ms alone: done at 0.210.
    assert b.ttft == pytest.approx(0.105, abs=1e-6)


def test_without_contention_steps_take_their_cost() -> None:
    costs = StepCosts(PrefillCost(100.0, 0.0), DecodeCost(10.0, 0.0), FREE_LINK)
    a, b = simulate(ClusterSpec("disagg"), costs, [SimRequest(0.0, 1, 2), SimRequest(0.105, 1, 1)])
    assert a.tpot == pytest.approx(0.010)
    assert b.ttft == pytest.approx(0.100, abs=1e-6)


def test_path_spread_is_walked_evenly_and_deterministically() -> None:
    costs = StepCosts(PrefillCost(0.0, 0.0), DecodeCost(1.0, 0.0), FREE_LINK, router_ms=10.0,
                      path_jitter_ms=(-20.0, 0.0, 10.0, 30.0))
    draws = [costs.path_ms(i) for i in range(400)]
    assert draws == [costs.path_ms(i) for i in range(400)]
    counts = Counter(draws)
    assert set(counts) == {0.0, 10.0, 20.0, 40.0}  # -20 clamps at zero latency
    assert max(counts.values()) - min(counts.values()) <= 8  # every stretch sees the spread evenly
    # lone requests replay it: TTFT = path + the prefill step, one draw each
    recs = simulate(ClusterSpec("disagg"), replace_prefill(costs, 50.0),
                    [SimRequest(i * 1.0, 1, 1) for i in range(8)])
    assert [round(r.ttft * 1e3, 6) for r in recs] == [round(costs.path_ms(i) + 50.0, 6) for i in range(8)]


def replace_prefill(costs: StepCosts, fixed_ms: float) -> StepCosts:
    return StepCosts(PrefillCost(fixed_ms, 0.0), costs.decode, costs.transfer, costs.router_ms,
                     path_jitter_ms=costs.path_jitter_ms)


def test_residuals_are_the_lone_ttfts_around_the_prefill_fit_sorted() -> None:
    fit = PrefillCost(100.0, 2.0)
    lone = [Obs(0.0, n, 4, (100 + 2 * n + e) / 1e3, 0.05, 1.0)
            for n, e in ((10, 30.0), (50, -12.5), (90, 0.0))]
    assert residuals_ms(lone, fit) == (-12.5, 0.0, 30.0)


def test_noise_band_brackets_the_percentile_and_is_seeded() -> None:
    assert noise_band([5.0] * 9, 50) == (5.0, 5.0)
    values = [float(v) for v in range(1, 10)]
    lo, hi = noise_band(values, 50)
    assert 1.0 <= lo < 5.0 < hi <= 9.0
    assert noise_band(values, 50) == (lo, hi)
    lo90, hi90 = noise_band(values, 90)
    assert hi90 <= 9.0 and lo90 > lo


SLO = Slo(2.0, 0.3)
TRUTH = StepCosts(PrefillCost(60.0, 2.0), DecodeCost(30.0, 10.0), TransferCost(46080, 30, 0.31, 1.6),
                  router_ms=140.0, contention=1.0)


def _run_json(path: Path, requests: list[SimRequest]) -> Path:
    records: list[RequestRecord] = simulate(CPU_CLUSTER, TRUTH, requests)
    path.write_text(json.dumps({"config": {"slo_ttft": SLO.ttft, "slo_tpot": SLO.tpot}, "rate": 1.0,
                                "sweep": None, "run": summarize(records, slo=SLO).to_dict(),
                                "records": [asdict(r) for r in records]}))
    return path


def _runs(tmp_path: Path) -> list[Path]:
    lone = [SimRequest(5.0 * i, n, 8) for i, n in enumerate((16, 64, 128, 256))]
    burst = [SimRequest(0.3 * i, 32 + 40 * (i % 3), 12) for i in range(12)]
    lone_too = [SimRequest(6.0 * i, n, 6) for i, n in enumerate((32, 96, 200))]
    return [_run_json(tmp_path / f"serving_cpu_{name}.json", reqs)
            for name, reqs in (("lone", lone), ("burst", burst), ("more", lone_too))]


TINY = Grid(worker_share=(0.3,), per_seq_ms=(10.0,), contention=(1.0,))


def test_crossval_fits_without_each_run_and_reports_both_errors(tmp_path: Path) -> None:
    compared = crossval(_runs(tmp_path), grid=TINY)
    assert [c.run for c in compared if c.metric == "TTFT p50 ms"] == ["lone", "burst", "more"]
    for c in compared:
        assert (c.in_sample.run, c.in_sample.metric) == (c.held_out.run, c.held_out.metric)
        assert c.in_sample.measured == c.held_out.measured
    # the simulator's own runs: recovered in-sample, and predicted when left out
    assert max(abs(c.in_sample.rel_err) for c in compared if c.metric.endswith("ms")) < 0.05
    assert max(abs(c.held_out.rel_err) for c in compared if c.metric.endswith("ms")) < 0.05
    text = format_crossval(compared).splitlines()
    assert text[0].split() == ["run", "metric", "measured", "in-sample", "err", "held-out", "err", "noise",
                               "band", "(90%)"]
    assert len(text) == 1 + len(compared) + 2
    assert text[-2].startswith("in-sample: TTFT: 6/6 within 15%")
    assert text[-1].startswith("held-out: TTFT: 6/6 within 15%")


def test_validate_prints_each_figure_with_its_noise_band_and_a_count(tmp_path: Path, capsys) -> None:
    paths = _runs(tmp_path)
    save_costs(TRUTH, tmp_path / "costs.json")
    assert main(["validate", "--costs", str(tmp_path / "costs.json"), "--runs", *map(str, paths)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "metric", "measured", "sim", "rel", "err", "noise", "band", "in"]
    burst_ttft = next(line for line in lines if line.startswith("burst") and "TTFT p50" in line)
    assert burst_ttft.split()[-1] == "yes" and "+0.0%" in burst_ttft
    assert lines[-2].startswith("15 of 15 figures within 15%; 12 of 12 latency figures inside their")
    assert lines[-1] == ("TTFT: 6/6 within 15%, 6 in the noise band; TPOT: 6/6 within 15%, 6 in the noise "
                         "band; goodput: 0/0 within 15%")


POLICY_COSTS = StepCosts(PrefillCost(10.0, 1.0), DecodeCost(20.0, 0.0), FREE_LINK)


def test_fair_prefill_lets_a_short_prompt_start_beside_a_long_one() -> None:
    # a 50-token prompt holds the prefill worker 0-60 ms while a long and a short one queue behind it
    reqs = [SimRequest(0.0, 50, 1), SimRequest(0.001, 1000, 1), SimRequest(0.001, 10, 1)]
    _, fcfs_long, fcfs_short = simulate(ClusterSpec("disagg"), POLICY_COSTS, reqs)
    _, fair_long, fair_short = simulate(ClusterSpec("disagg", long_prefill_threshold=100), POLICY_COSTS, reqs)
    # FCFS: 512 long tokens, then the other 488 with the short one: 60 + 522 + 508 ms
    assert fcfs_short.ttft == pytest.approx(1.090 - 0.001, abs=1e-6)
    assert fcfs_long.ttft == pytest.approx(1.090 - 0.001, abs=1e-6)
    # fair: 100 long tokens beside the short one (60 + 120 ms); the long one then runs alone, uncontended,
    # 512 + 388 (+ 522 + 398 ms)
    assert fair_short.ttft == pytest.approx(0.180 - 0.001, abs=1e-6)
    assert fair_long.ttft == pytest.approx(1.100 - 0.001, abs=1e-6)


def test_only_max_long_partial_prefills_long_prompts_progress_at_once() -> None:
    spec = ClusterSpec("disagg", long_prefill_threshold=100, max_long_partial_prefills=1)
    _, a, b = simulate(spec, POLICY_COSTS, [SimRequest(0.0, 50, 1), SimRequest(0.001, 300, 1),
                                            SimRequest(0.001, 300, 1)])
    # after the 60 ms blocker: a 100 (b waits), a 100 (b waits), a's last 100 (no longer long) + b's first
    # 100, then b's last 200 alone
    assert a.ttft == pytest.approx(0.060 + 0.110 + 0.110 + 0.210 - 0.001, abs=1e-6)
    assert b.ttft == pytest.approx(a.ttft + 0.210, abs=1e-6)


def test_validate_can_replay_another_decode_slope_with_the_one_stream_step_kept(tmp_path: Path,
                                                                               capsys) -> None:
    paths = [str(p) for p in _runs(tmp_path)]
    save_costs(TRUTH, tmp_path / "costs.json")
    base = ["validate", "--costs", str(tmp_path / "costs.json"), "--runs", *paths]
    assert main([*base, "--per-seq-ms", "10"]) == 0  # TRUTH's own slope: the same replay
    assert capsys.readouterr().out.splitlines()[-2].startswith("15 of 15 figures within 15%")
    assert main([*base, "--per-seq-ms", "40"]) == 0
    burst_tpot = next(line for line in capsys.readouterr().out.splitlines()
                      if line.startswith("burst") and "TPOT p50" in line)
    assert float(burst_tpot.split()[6].rstrip("%")) > 15  # batches of several streams pay the steeper slope
