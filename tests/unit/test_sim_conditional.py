"""The simulator's conditional placement: the router's cost policy decides from the simulated workers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.serving.sim_costs import DecodeCost, PrefillCost, StepCosts, TransferCost
from bench.serving.sim_events import ClusterSpec, SimRequest, Simulation, simulate
from bench.serving.sim_runs import load_runs

# 1 ms a prompt token, 20 ms + 5 ms a stream a decode step, a fast link.
COSTS = StepCosts(prefill=PrefillCost(0.0, 1.0), decode=DecodeCost(20.0, 5.0),
                  transfer=TransferCost(1000, 10, 10.0, latency_ms=1.0))
COND = ClusterSpec("cond", fused_max_slowdown=1.35)


def test_two_prompts_at_once_are_prefilled_one_on_each_worker() -> None:
    # The first finds both idle: local saves the transfer, so it stays; the second would wait 800 ms behind
    # that one on the decode worker (a prompt behind a local one is priced at the credit's pace) and 400 ms
    # on the prefill worker, so it goes remote, and lands while the first decodes.
    reqs = [SimRequest(0.0, 400, 4), SimRequest(0.0, 400, 4)]
    sim = Simulation(COND, COSTS, reqs)
    first, second = sim.run()
    assert sim.placements == {"local/local_cheaper": 1, "remote/remote_cheaper": 1}
    assert first.ttft == pytest.approx(0.4)
    assert second.ttft == pytest.approx(0.4 + COSTS.decode.step_ms(1, 0) / 1e3)  # joins at a step's end
    # Pure disaggregation queues it: the second prompt's first token after both prefills.
    assert simulate(ClusterSpec("disagg"), COSTS, reqs)[1].ttft > 0.8


def test_a_prompt_arriving_beside_a_running_decode_goes_to_the_idle_prefill_worker() -> None:
    # Alone, a prompt stays on the decode worker (no transfer to pay); the next one arrives while that one
    # decodes, where it would prefill at the credit's pace (about half speed until measured): remote.
    reqs = [SimRequest(0.0, 300, 40), SimRequest(0.5, 300, 4)]
    sim = Simulation(COND, COSTS, reqs)
    sim.run()
    assert sim.placements == {"local/local_cheaper": 1, "remote/remote_cheaper": 1}


def test_a_compare_file_with_several_configurations_replays_each_on_its_own_cluster(tmp_path: Path) -> None:
    cfg = {"num_requests": 2, "slo_ttft": 2.0, "slo_tpot": 0.3}
    records = [{"index": i, "warmup": False, "sent_at": 1.0 * i, "status": "OK", "prompt_tokens": 300,
                "output_tokens": 4, "ttft": 0.5, "tpot": 0.05, "e2e": 0.7} for i in range(2)]
    flags = {"colocated-2": ["--decode", "2", "--prefill-placement", "threshold",
                             "--local-prefill-max-tokens", "4096"],
             "conditional": ["--prefill-placement", "cost"]}
    path = tmp_path / "serving_cmp.json"
    path.write_text(json.dumps([{"label": label, "config": cfg, "rate": 1.0, "sweep": None, "run": {},
                                 "records": records, "up_flags": f} for label, f in flags.items()]))
    runs = load_runs(path)
    assert [(r.stem, r.spec.mode, r.spec.decode_workers) for r in runs] == [
        ("serving_cmp:colocated-2", "coloc", 2), ("serving_cmp:conditional", "cond", 1)]


def test_validating_a_conditional_sweep_compares_how_many_prompts_went_local(tmp_path: Path) -> None:
    from bench.serving.sim_validate import validate

    cfg = {"num_requests": 2, "slo_ttft": 2.0, "slo_tpot": 0.3, "prompt_len": "fixed:400",
           "output_len": "fixed:4", "seed": 0, "arrival": "constant", "warmup": 0, "sweep": [1.0, 2.0],
           "slo_target": 0.9, "sweep_tol": 0.1, "sweep_probes": 2}
    records = [{"index": i, "warmup": False, "sent_at": 0.0, "status": "OK", "prompt_tokens": 400,
                "output_tokens": 4, "ttft": 0.5, "tpot": 0.05, "e2e": 0.7} for i in range(2)]
    summary = {"ttft_s": {"p50": 0.5, "p90": 0.5}, "tpot_s": {"p50": 0.05, "p90": 0.05},
               "slo_attainment": 1.0}
    path = tmp_path / "serving_cond.json"
    path.write_text(json.dumps({"label": "conditional", "config": cfg, "sweep": {
        "goodput_rps": 1.0, "probes": [{"rate": 1.0, "summary": summary, "records": records}]},
        "up_flags": ["--prefill-placement", "cost"], "prefill_placements": {"local/local_cheaper": 1,
                                                                            "remote/warming_up": 1}}))
    local = [r for r in validate([path], COSTS) if r.metric == "local prefills"]
    assert [(r.measured, r.simulated) for r in local] == [(1, 1)]  # the two-prompts-at-once case above
