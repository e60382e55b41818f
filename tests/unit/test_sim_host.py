"""A run's placement kind (from its `pdserve up` flags) picks the host sharing it is fitted with."""
from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from bench.serving.client import RequestRecord
from bench.serving.metrics import Slo, summarize
from bench.serving.sim_calibrate import Grid, fit_cpu
from bench.serving.sim_costs import DecodeCost, PrefillCost, StepCosts, TransferCost, load_costs, save_costs
from bench.serving.sim_events import SimRequest, simulate
from bench.serving.sim_fit import EngineSteps
from bench.serving.sim_host import PINNED, PINNED_SHARED, UNPINNED, placement_kind
from bench.serving.sim_runs import cluster_for, load_runs
from bench.serving.sim_validate import validate

DISAGG = ["--device", "cpu", "--prefix-caching", "off", "--prefill-placement", "threshold",
          "--local-prefill-max-tokens", "0"]
PINNED_DISAGG = ["--cpu-affinity", "auto", *DISAGG]
SLO = Slo(2.0, 0.3)
TRUTH = StepCosts(PrefillCost(60.0, 2.0), DecodeCost(30.0, 10.0), TransferCost(46080, 30, 0.31, 1.6),
                  router_ms=140.0)


def test_placement_kind_reads_affinity_and_counts_engine_processes_against_cores() -> None:
    assert placement_kind(None) == UNPINNED  # a run file from before `up_flags` were recorded
    assert placement_kind(DISAGG) == UNPINNED
    assert placement_kind(["--cpu-affinity", "off", *DISAGG]) == UNPINNED
    assert placement_kind(PINNED_DISAGG) == PINNED  # 1 prefill + 1 decode on 2 cores
    # colocated-2: its idle prefill worker is started too, 3 processes on 2 cores share them round-robin
    assert placement_kind([*PINNED_DISAGG, "--decode", "2"]) == PINNED_SHARED
    assert placement_kind([*PINNED_DISAGG, "--decode", "2"], cores=4) == PINNED
    assert placement_kind([*PINNED_DISAGG, "--prefill", "2", "--decode", "2"], cores=3) == PINNED_SHARED


def test_costs_replay_each_kind_with_its_own_contention_and_keep_it_through_json(tmp_path: Path) -> None:
    costs = StepCosts(PrefillCost(1.0, 2.0), DecodeCost(4.0, 5.0), TransferCost(7, 8, 9.0), contention=1.5,
                      decode_contention=0.5, placement_contention={PINNED: (0.2, 0.1), UNPINNED: (1.5, 0.5)})
    pinned = costs.for_placement(PINNED)
    assert (pinned.contention, pinned.decode_contention) == (0.2, 0.1)
    assert pinned.contention_of("decode") == 0.1 and pinned.contention_of("prefill") == 0.2
    assert costs.for_placement(PINNED_SHARED) is costs  # not fitted: the default's
    save_costs(costs, tmp_path / "c.json")
    assert load_costs(tmp_path / "c.json") == costs


def _run_json(path: Path, reqs: list[SimRequest], up_flags: list[str] | None, contention: float) -> Path:
    """What `bench compare --json` keeps of one configuration's single run, simulated at `contention`."""
    spec = cluster_for(up_flags, max(r.prompt for r in reqs))
    records: list[RequestRecord] = simulate(spec, replace(TRUTH, contention=contention), reqs)
    path.write_text(json.dumps({"config": {"slo_ttft": SLO.ttft, "slo_tpot": SLO.tpot}, "rate": 1.0,
                                "sweep": None, "up_flags": up_flags,
                                "run": summarize(records, slo=SLO).to_dict(),
                                "records": [asdict(r) for r in records]}))
    return path


def test_the_fit_finds_each_placement_kinds_contention_and_validate_uses_it(tmp_path: Path) -> None:
    steps = {"prefill": [{"tokens": n, "step_ms": TRUTH.prefill.step_ms([(n, 0)])} for n in (16, 64, 256)],
             "decode": [{"batch": b, "context": 64, "step_ms": TRUTH.decode.step_ms(b, 0)}
                        for b in (1, 4, 16)]}
    (tmp_path / "engine.json").write_text(json.dumps(steps))
    lone = [SimRequest(5.0 * i, n, 8) for i, n in enumerate((16, 64, 128, 256))]
    burst = [SimRequest(0.3 * i, 32 + 40 * (i % 3), 12) for i in range(12)]
    paths = [_run_json(tmp_path / "lone.json", lone, None, 2.0),
             _run_json(tmp_path / "unpinned.json", burst, None, 2.0),
             _run_json(tmp_path / "pinned.json", burst, PINNED_DISAGG, 0.2)]
    assert [f.placement for p in paths for f in load_runs(p)] == [UNPINNED, UNPINNED, PINNED]
    fit = fit_cpu(paths, grid=Grid(contention=(0.0, 1.0, 2.0), pinned_contention=(0.0, 0.2, 0.5)),
                  engine=EngineSteps.load(tmp_path / "engine.json"))
    assert set(fit.placement_contention) == {UNPINNED, PINNED}
    assert fit.placement_contention[UNPINNED][0] == 2.0
    assert fit.placement_contention[PINNED][0] == pytest.approx(0.2)
    assert fit.contention == 2.0  # the default stays the unpinned kind's
    # replayed with its own kind's sharing, each run is reproduced; one shared contention misses one of them
    assert max(abs(r.rel_err) for r in validate(paths, fit) if r.measured) < 0.05
    one = replace(fit, placement_contention={})
    assert max(abs(r.rel_err) for r in validate(paths, one) if r.measured) > 0.05
