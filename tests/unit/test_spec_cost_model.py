"""The measured cost model: fitted step costs, the draft length that pays, speculation off and probing."""
from __future__ import annotations

from engine.spec.adaptive import AdaptiveK
from engine.spec.cost_model import StepCosts


def costs_of(plain: float, per_row: float, verify: float = 0.0, draft: float = 0.0) -> StepCosts:
    costs = StepCosts()
    for step in range(16):
        drafts = step % 6  # 0..5 draft rows at batch 1
        costs.observe_step(1, int(drafts > 0), drafts, plain + verify * (drafts > 0) + per_row * drafts)
    costs.observe_drafting(1, 5, 0.0, 5 * draft)
    return costs


def test_no_estimate_until_the_drafts_vary() -> None:
    costs = StepCosts()
    for _ in range(20):
        costs.observe_step(1, 1, 5, 0.1)
    assert costs.draft_length(0.9, 1, 5) is None


def test_draft_length_is_where_acceptance_to_the_j_stops_paying_for_a_row() -> None:
    # A plain token costs 0.046 s, a draft row 0.02 s: draft j pays while a^j > 0.02 / 0.046 = 0.435.
    costs = costs_of(0.046, 0.02)
    assert costs.draft_length(0.9, 1, 5) == 5  # 0.9^5 = 0.59
    assert costs.draft_length(0.7, 1, 5) == 2  # 0.49 > 0.435 > 0.343
    assert costs.draft_length(0.4, 1, 5) == 0  # not even the first draft pays
    # Nearly free rows (a GPU verify): even a poor drafter drafts.
    assert costs_of(0.01, 0.0001).draft_length(0.3, 1, 5) == 3
    # A fixed cost of verifying at all (this CPU: the first extra row costs most): one draft never pays
    # at acceptance 0.5, three do; at 0.4 none.
    assert costs_of(0.035, 0.003, verify=0.02).draft_length(0.5, 1, 5) == 3
    assert costs_of(0.035, 0.003, verify=0.02).draft_length(0.4, 1, 5) == 0
    # Drafting time counts as part of a row's cost.
    assert costs_of(0.046, 0.02, draft=0.03).draft_length(0.9, 1, 5) == 0


def test_requests_whose_drafts_do_not_pay_run_plain_and_probe_on_the_same_eighth_steps() -> None:
    costs = costs_of(0.046, 0.03)  # 16 steps observed
    first, second = AdaptiveK(5, costs=costs), AdaptiveK(5, costs=costs)
    for _ in range(10):
        first.update(drafted=1, accepted=0)
    got: list[tuple[int, int]] = []
    for step in range(16):
        if step == 3:  # the second request stops paying later: it still probes on the engine's clock
            for _ in range(10):
                second.update(drafted=1, accepted=0)
        got.append((first.next(2), second.next(2)))
        costs.observe_step(2, 0, 0, 0.09)
    assert [a for a, _ in got] == [1] + [0] * 7 + [1] + [0] * 7  # steps 16 and 24 of the clock
    assert [b for _, b in got][3:] == [0] * 5 + [1] + [0] * 7
    for _ in range(30):  # the probes start being accepted: drafting resumes
        first.update(drafted=1, accepted=1)
    assert first.next(1) >= 1


def test_a_batch_that_leaves_the_flat_path_when_any_sequence_verifies_charges_each_request_that() -> None:
    # 8 sequences: 0.1 s plain, +0.1 s once any of them verifies (the eager path), 2 ms a draft row.
    costs = StepCosts()
    for step in range(24):
        verifying = step % 4  # 0..3 sequences drafting 2 each
        costs.observe_step(8, verifying, 2 * verifying, 0.1 + 0.1 * (verifying > 0) + 0.002 * 2 * verifying)
    # A token costs 12.5 ms a sequence: even sure drafts cannot pay a 100 ms switch alone.
    assert costs.draft_length(0.99, 8, 5) == 0
    # At batch 1 the two verify terms coincide and their sum is the verify cost.
    assert costs_of(0.035, 0.003, verify=0.02).draft_length(0.4, 1, 5) == 0


def test_without_costs_or_adaptivity_the_acceptance_rule_alone_decides() -> None:
    assert AdaptiveK(5).next(1) == 5
    assert AdaptiveK(3, adaptive=False, costs=costs_of(0.046, 0.05)).next(1) == 3
