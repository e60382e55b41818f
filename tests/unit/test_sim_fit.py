"""The simulator's cost fits recover known parameters from synthetic data; replaying its own runs matches."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from bench.serving.client import RequestRecord
from bench.serving.metrics import Slo, summarize
from bench.serving.sim_calibrate import Grid, fit_cpu
from bench.serving.sim_costs import DecodeCost, PrefillCost, StepCosts, TransferCost, load_costs, save_costs
from bench.serving.sim_events import SimRequest, simulate
from bench.serving.sim_fit import EngineSteps, Obs, fit_h100, fit_prefill, isolated
from bench.serving.sim_validate import CPU_CLUSTER, host_slowdown, validate


def test_prefill_fit_recovers_fixed_linear_and_pair_terms() -> None:
    truth = PrefillCost(120.0, 2.5, 0.004)
    lone = [Obs(float(i), n, 8, truth.step_ms([(n, 0)]) / 1e3, None, 1.0)
            for i, n in enumerate((16, 64, 200, 512))]
    fit = fit_prefill(lone)
    assert fit.fixed_ms == pytest.approx(120.0)
    assert fit.per_token_ms == pytest.approx(2.5)
    assert fit.per_pair_ms == pytest.approx(0.004)


def test_lone_requests_are_those_sent_with_nothing_in_flight() -> None:
    obs = [Obs(0.0, 8, 8, 0.1, 0.01, 1.0), Obs(0.5, 8, 8, 0.1, 0.01, 1.0), Obs(3.0, 8, 8, 0.1, 0.01, 1.0)]
    assert [o.sent for o in isolated(obs)] == [0.0, 3.0]


def test_h100_fit_recovers_decode_coefficients_and_hits_the_measured_prefill(tmp_path: Path) -> None:
    decode = DecodeCost(5.0, 0.02, 5e-5)
    steps = [{"batch": b, "context": c, "ours_step_ms": decode.step_ms(b, b * c)}
             for b in (1, 8, 32, 128) for c in (512, 4096)]
    path = tmp_path / "decode_gpu.json"
    path.write_text(json.dumps({"decode": steps, "weight_bytes_per_step": 15e9,
                                "prefill": {"tokens": 2048, "step_ms": 50.0}}))
    costs = fit_h100(path)
    assert costs.decode.fixed_ms == pytest.approx(5.0)
    assert costs.decode.per_seq_ms == pytest.approx(0.02)
    assert costs.decode.per_ctx_token_ms == pytest.approx(5e-5)
    assert costs.prefill.fixed_ms == pytest.approx(decode.step_ms(1, 512))
    assert costs.prefill.step_ms([(2048, 0)]) == pytest.approx(50.0)


SLO = Slo(2.0, 0.3)


def _harness_json(path: Path, records: list[RequestRecord], slo: Slo = SLO) -> Path:
    """What `pdserve bench --json` writes for a single run (the fields the simulator reads)."""
    path.write_text(json.dumps({"config": {"slo_ttft": slo.ttft, "slo_tpot": slo.tpot}, "rate": 1.0,
                                "sweep": None, "run": summarize(records, slo=slo).to_dict(),
                                "records": [asdict(r) for r in records]}))
    return path


def _synthetic_runs(costs: StepCosts, tmp_path: Path) -> list[Path]:
    """Runs the simulator itself made: some lone requests of several lengths, then bursts that load it."""
    lone = [SimRequest(5.0 * i, n, 8) for i, n in enumerate((16, 64, 128, 256))]
    burst = [SimRequest(0.3 * i, 32 + 40 * (i % 3), 12) for i in range(12)]
    return [_harness_json(tmp_path / f"run{k}.json", simulate(CPU_CLUSTER, costs, reqs))
            for k, reqs in enumerate((lone, burst))]


def test_cpu_calibration_recovers_the_grid_point_that_made_the_runs(tmp_path: Path) -> None:
    truth = StepCosts(PrefillCost(60.0, 2.0), DecodeCost(30.0, 10.0), TransferCost(46080, 30, 0.31, 1.6),
                      router_ms=140.0, contention=1.0)
    paths = _synthetic_runs(truth, tmp_path)
    fit = fit_cpu(paths, grid=Grid(worker_share=(0.3, 0.6), per_seq_ms=(5.0, 10.0, 20.0),
                                   contention=(0.0, 1.0)))
    # Lone TTFTs give a fixed 200 ms and 2 ms a token; the grid puts 30% of it on the prefill worker ...
    assert fit.prefill.per_token_ms == pytest.approx(2.0, rel=0.02)
    assert fit.router_ms + fit.prefill.fixed_ms == pytest.approx(200.0, rel=0.02)
    assert fit.prefill.fixed_ms == pytest.approx(60.0, rel=0.02)
    assert fit.decode.per_seq_ms == 10.0
    assert fit.contention == 1.0
    # ... and the replay with the fitted costs reproduces the runs.
    rows = validate(paths, fit)
    assert max(abs(r.rel_err) for r in rows if r.measured) < 0.05


def test_costs_round_trip_through_json(tmp_path: Path) -> None:
    costs = StepCosts(PrefillCost(1.0, 2.0, 3.0), DecodeCost(4.0, 5.0, 6.0), TransferCost(7, 8, 9.0, 10.0),
                      router_ms=11.0, contention=0.5, source={"prefill": "test"})
    save_costs(costs, tmp_path / "c.json")
    assert load_costs(tmp_path / "c.json") == costs


def test_tensor_parallel_scales_step_costs_by_tp_and_efficiency() -> None:
    costs = StepCosts(PrefillCost(10.0, 1.0), DecodeCost(8.0, 0.5), TransferCost(100, 4, 10.0))
    tp2 = costs.with_tp(2, 0.9)
    assert tp2.prefill.step_ms([(100, 0)]) == pytest.approx(110.0 / 1.8)
    assert tp2.decode.step_ms(4, 0) == pytest.approx(10.0 / 1.8)
    assert tp2.transfer.gb_per_s == 20.0
    with pytest.raises(ValueError, match="power of two"):
        costs.with_tp(3, 0.9)


def test_host_slowdown_finds_the_factor_a_run_was_slowed_by(tmp_path: Path) -> None:
    costs = StepCosts(PrefillCost(60.0, 2.0), DecodeCost(30.0, 10.0), TransferCost(46080, 30, 0.31, 1.6),
                      router_ms=140.0, contention=1.0)
    burst = [SimRequest(0.3 * i, 32 + 40 * (i % 3), 12) for i in range(12)]
    path = _harness_json(tmp_path / "slow.json", simulate(CPU_CLUSTER, costs.slowed(2.0), burst))
    factor, rows = host_slowdown(path, costs)
    assert factor == 2.0
    assert max(abs(r.rel_err) for r in rows if r.measured) < 1e-6


def test_with_the_engine_timed_alone_only_the_path_and_contention_are_left_to_fit(tmp_path: Path) -> None:
    truth = StepCosts(PrefillCost(60.0, 2.0), DecodeCost(30.0, 10.0), TransferCost(46080, 30, 0.31, 1.6),
                      router_ms=140.0, contention=1.0)
    steps = {"prefill": [{"tokens": n, "step_ms": truth.prefill.step_ms([(n, 0)])} for n in (16, 64, 256)],
             "decode": [{"batch": b, "context": 64, "step_ms": truth.decode.step_ms(b, 0)}
                        for b in (1, 4, 16)]}
    (tmp_path / "engine.json").write_text(json.dumps(steps))
    engine = EngineSteps.load(tmp_path / "engine.json")
    assert engine.prefill.step_ms([(100, 0)]) == pytest.approx(260.0)
    assert engine.per_seq_ms == pytest.approx(10.0)
    fit = fit_cpu(_synthetic_runs(truth, tmp_path), grid=Grid(contention=(0.0, 1.0, 2.0)), engine=engine)
    # every lone request's TTFT is 140 ms beyond its prefill step: that is the path, on no worker
    assert fit.router_ms == pytest.approx(140.0, abs=0.1)
    assert fit.prefill == engine.prefill
    assert (fit.decode.fixed_ms + fit.decode.per_seq_ms, fit.decode.per_seq_ms) == pytest.approx((40.0, 10.0))
    assert fit.contention == 1.0


def test_engine_prefill_after_a_cached_prefix_sets_the_pair_term(tmp_path: Path) -> None:
    truth = PrefillCost(20.0, 3.0, 0.004)
    rows = [{"tokens": n, "cached": c, "step_ms": truth.step_ms([(n, c)])}
            for n, c in ((16, 0), (64, 0), (256, 0), (32, 256), (64, 256))]
    (tmp_path / "engine.json").write_text(json.dumps({"prefill": rows, "decode": [
        {"batch": 1, "step_ms": 30.0}, {"batch": 2, "step_ms": 35.0}]}))
    engine = EngineSteps.load(tmp_path / "engine.json")
    assert (engine.prefill.fixed_ms, engine.prefill.per_token_ms, engine.prefill.per_pair_ms) == \
        pytest.approx((20.0, 3.0, 0.004))
    assert engine.per_seq_ms == pytest.approx(5.0)
