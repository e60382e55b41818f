"""The simulator's step spread: the quantile table, the correlated walk, its fit, what it does to a run."""
from __future__ import annotations

import json
import random
import statistics
from dataclasses import replace

import pytest

from bench.serving.metrics import Slo, summarize
from bench.serving.sim_costs import DecodeCost, PrefillCost, StepCosts, TransferCost
from bench.serving.sim_events import ClusterSpec, SimRequest, simulate
from bench.serving.sim_fit import EngineSteps
from bench.serving.sim_spread import SpreadWalk, StepSpread, fit_rho, fit_spread, mean_variance_ratio
from bench.serving.sim_validate import SEEDS, seeds

TABLE = StepSpread((0.8, 0.9, 1.0, 1.1, 1.5))
COSTS = StepCosts(prefill=PrefillCost(10.0, 1.0), decode=DecodeCost(30.0, 5.0),
                  transfer=TransferCost(1000, 10, 1.0), router_ms=3.0)
# lone requests, one every 2 s: nothing queues, so only the steps' own spread moves TTFT and TPOT
LONE = [SimRequest(2.0 * i, 100, 16) for i in range(60)]


def test_a_uniform_draw_maps_through_the_table_as_an_inverse_cdf() -> None:
    assert TABLE.factor(0.0) == pytest.approx(0.8)
    assert TABLE.factor(0.5) == pytest.approx(1.0)
    assert TABLE.factor(0.875) == pytest.approx(1.3)  # halfway between the 75th (1.1) and 100th (1.5)
    assert TABLE.factor(1 - 1e-12) == pytest.approx(1.5)


def test_the_walk_keeps_the_tables_distribution_and_correlates_consecutive_steps() -> None:
    spread = replace(TABLE, rho=0.9)
    walk = SpreadWalk(seed=3)
    xs = [walk.factor(spread, ("decode", 0, "decode")) for _ in range(20000)]
    assert statistics.median(xs) == pytest.approx(1.0, abs=0.02)
    assert min(xs) >= 0.8 and max(xs) <= 1.5
    lag1 = statistics.correlation(xs[:-1], xs[1:])
    assert 0.8 < lag1 < 0.95  # the Gaussian walk's 0.9, a little lower through the table's kinks
    again = SpreadWalk(seed=3)
    assert [again.factor(spread, ("decode", 0, "decode")) for _ in range(100)] == xs[:100]


def test_rho_is_fitted_from_how_much_stretches_of_steps_vary() -> None:
    rng, z, series = random.Random(0), 0.0, []
    for _ in range(20000):  # a synthetic AR(1) series of lag-1 correlation 0.8 around 1.0
        z = 0.8 * z + 0.6 * rng.gauss(0, 1)
        series.append(1.0 + 0.05 * z)
    assert fit_rho([series]) == pytest.approx(0.8, abs=0.05)
    shuffled = series[:]
    rng.shuffle(shuffled)
    assert fit_rho([shuffled]) < 0.1  # independent steps: their 15-step means vary sqrt(15)x less
    assert mean_variance_ratio(0.0, 15) == pytest.approx(1 / 15)
    assert fit_rho([series[:20]]) == 0.0  # too short to tell


def test_the_engine_json_gives_a_spread_per_step_kind_and_the_costs_file_keeps_it(tmp_path) -> None:
    rng = random.Random(1)
    steps = lambda level, n: [level * rng.uniform(0.9, 1.2) for _ in range(n)]  # noqa: E731
    (tmp_path / "e.json").write_text(json.dumps({
        "prefill": [{"tokens": n, "step_ms": 3.0 * n, "steps_ms": steps(3.0 * n, 8)} for n in (16, 64, 256)],
        "decode": [{"batch": b, "step_ms": 30 + 5 * b, "steps_ms": steps(30 + 5 * b, 40)} for b in (1, 4)]}))
    e = EngineSteps.load(tmp_path / "e.json")
    assert len(e.prefill_spread.quantiles) == len(e.decode_spread.quantiles) == 41
    assert 0.8 < e.decode_spread.quantiles[0] < 1.0 < e.decode_spread.quantiles[-1] < 1.2  # over the mean
    assert e.prefill_spread.rho == 0.0  # 8 steps a point: too short for a correlation
    costs = replace(COSTS, prefill_spread=e.prefill_spread, decode_spread=e.decode_spread)
    assert StepCosts.from_dict(json.loads(json.dumps(costs.to_dict()))) == costs
    assert StepCosts.from_dict(json.loads(json.dumps(COSTS.to_dict()))).decode_spread is None
    assert fit_spread([[1.0]], "mean") is None


def test_with_a_spread_lone_requests_miss_an_slo_inside_it_and_a_seed_replays_the_run() -> None:
    spread = StepSpread((0.85, 0.95, 1.0, 1.1, 1.4), rho=0.85)
    costs = replace(COSTS, decode_spread=spread, prefill_spread=StepSpread((0.95, 1.0, 1.1)))
    slo = Slo(ttft=1.0, tpot=0.035 * 1.1)  # the one-stream step is 35 ms: 10% over it
    exact = summarize(simulate(ClusterSpec("disagg"), COSTS, LONE), slo=slo)
    assert exact.slo_attainment == 1.0  # every step exactly 35 ms: an SLO 10% above never fails
    spread_run = simulate(ClusterSpec("disagg"), costs, LONE, seed=7)
    attained = summarize(spread_run, slo=slo).slo_attainment
    assert 0.5 < attained < 1.0
    tpots = [r.tpot for r in spread_run]
    assert max(tpots) > 1.15 * min(tpots)  # correlated steps: whole requests run slow or fast
    assert simulate(ClusterSpec("disagg"), costs, LONE, seed=7) == spread_run
    assert simulate(ClusterSpec("disagg"), costs, LONE, seed=8) != spread_run


def test_a_replay_runs_several_seeds_only_when_the_costs_have_a_spread() -> None:
    assert seeds(COSTS) == range(1)  # exact steps: every seed replays the same run
    assert len(seeds(replace(COSTS, decode_spread=TABLE))) == SEEDS > 1
