"""The simulator's search: seeded determinism, the known-best P:D ratio on a built case, the projection."""
from __future__ import annotations

from dataclasses import replace

import pytest

from bench.serving.metrics import Slo
from bench.serving.sim_costs import DecodeCost, PrefillCost, StepCosts, TransferCost
from bench.serving.sim_events import ClusterSpec, simulate
from bench.serving.sim_search import (
    Mix,
    SearchSettings,
    Unit,
    best_bound,
    candidate_units,
    project,
    search,
    work_bound,
    workload,
)
from bench.serving.workload import parse_length

# A prompt costs its prefill worker 30 ms; an answer costs its decode worker 10 ms (ten 1-ms steps of one
# stream each, since a step costs 1 ms a stream): a prefill worker serves ~33 req/s, a decode worker ~100.
# On 4 GPUs the best split is 3P:1D (~100 req/s); 2P:2D gives ~66 and 1P:3D ~33.
COSTS = StepCosts(prefill=PrefillCost(0.0, 1.0), decode=DecodeCost(0.0, 1.0),
                  transfer=TransferCost(1, 1, 1e9))
MIX = Mix("constructed", parse_length("fixed:30"), parse_length("fixed:11"), Slo(ttft=0.2, tpot=0.5))
FAST = SearchSettings(tp_choices=(1,), unit_max_gpus=4, seconds=3.0, min_requests=100, coloc_budgets=(512,),
                      simulate_top=3, rel_tol=0.05)


def test_the_same_seed_gives_the_same_run_and_another_seed_another() -> None:
    spec = ClusterSpec("disagg", 2, 2)
    runs = [simulate(spec, COSTS, workload(MIX, 50.0, SearchSettings(seed=s))) for s in (0, 0, 1)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_candidate_units_fill_the_unit_with_every_split_and_tp() -> None:
    units = candidate_units(4, SearchSettings(tp_choices=(1, 2), coloc_budgets=(512,), unit_max_gpus=4))
    assert all(u.gpus == 4 for u in units if u.mode == "disagg")
    splits = {(u.n_p, u.tp_p, u.n_d, u.tp_d) for u in units if u.mode == "disagg"}
    assert splits == {(1, 1, 3, 1), (2, 1, 2, 1), (3, 1, 1, 1), (2, 1, 1, 2), (1, 2, 2, 1), (1, 2, 1, 2)}
    assert {(u.tp_d, u.budget, u.fused) for u in units if u.mode == "coloc"} == {
        (1, 512, 0.0), (1, 512, 1.5), (2, 512, 0.0), (2, 512, 1.5)}


def test_search_picks_the_known_best_ratio() -> None:
    best = search(4, COSTS, MIX, FAST)
    assert best["disagg"].unit == Unit("disagg", 3, 1, 1, 1, FAST.prefill_budget)
    # ~100 req/s; a few seconds of Poisson arrivals let a slight overload pass before its queue grows.
    assert 80 < best["disagg"].goodput < 125


def test_projection_replicates_the_unit_over_the_gpu_count() -> None:
    (p4, p16) = project((4, 16), COSTS, [MIX], FAST)
    assert p4.disagg == p16.disagg  # the same 4-GPU unit: the same search
    assert p16.cluster_goodput(p16.disagg) == 4 * p4.cluster_goodput(p4.disagg)
    assert p16.gain == p4.gain


def test_work_bound_is_prefill_plus_the_answers_share_of_the_largest_batch_within_tpot() -> None:
    costs = StepCosts(PrefillCost(10.0, 1.0), DecodeCost(5.0, 1.0), TransferCost(1, 1, 1e9))
    mix = Mix("t", parse_length("fixed:100"), parse_length("fixed:10"), Slo(1.0, 0.020))
    b = work_bound(costs, mix, SearchSettings(max_num_seqs=64))
    assert (b.prefill_ms, b.batch) == (110.0, 15)  # 5 + 15 x 1 ms = the 20 ms TPOT
    assert b.decode_ms == pytest.approx(20.0 / 15 * 10)
    assert b.per_gpu == pytest.approx(1e3 / (110 + 20.0 / 15 * 10))
    tp2 = work_bound(costs, mix, SearchSettings(max_num_seqs=64), tp=2)
    assert tp2.prefill_ms == pytest.approx(2 * 110 / 1.8)  # two GPUs, each 1.8x faster than one


def test_best_bound_takes_each_role_at_its_own_best_tp() -> None:
    # TP2 runs a step 1.8x faster on 2 GPUs: prefill costs 110 GPU-ms at TP1, 122 at TP2; decode's batch is
    # capped by the 20 ms TPOT: 15 streams at TP1 (13.3 GPU-ms an answer), 31 at TP2 (12.9)
    costs = StepCosts(PrefillCost(10.0, 1.0), DecodeCost(5.0, 1.0), TransferCost(1, 1, 1e9))
    mix = Mix("t", parse_length("fixed:100"), parse_length("fixed:10"), Slo(1.0, 0.020))
    s = SearchSettings(tp_choices=(1, 2), tp_efficiency=0.9, max_num_seqs=64)
    p, d, bound = best_bound(costs, mix, s)
    assert (p.tp, d.tp) == (1, 2)
    assert bound == pytest.approx(1e3 / (p.prefill_ms + d.decode_ms))
    assert bound > max(work_bound(costs, mix, s, tp).per_gpu for tp in (1, 2))


def test_cpu_units_add_conditional_splits_and_a_colocated_unit_of_every_worker() -> None:
    s = SearchSettings(tp_choices=(1,), coloc_budgets=(512,), coloc_fused=(1.35,), unit_max_gpus=3,
                       coloc_pooled=True, conditional=True)
    units = candidate_units(3, s)
    assert {(u.n_p, u.n_d, u.fused) for u in units if u.mode == "cond"} == {(1, 2, 1.35), (2, 1, 1.35)}
    assert {u.n_d for u in units if u.mode == "coloc"} == {1, 3}
    assert str(Unit("cond", 1, 1, 1, 1, 512, 1.35)) == "cond 1P(TP1):1D(TP1) credit 1.35x"
    best = search(2, COSTS, MIX, replace(FAST, coloc_pooled=True, conditional=True, coloc_fused=(0.0, 1.5)))
    assert set(best) == {"disagg", "cond", "coloc"}
