"""What a decode worker adds to its load report for conditional placement: KV in flight, prefill pace."""
from __future__ import annotations

import dataclasses

from contracts.stats import EngineStats
from engine.step_cost import StepCostModel


def with_placement_costs(stats: EngineStats, step_cost: StepCostModel | None,
                         awaiting_kv: int) -> EngineStats:
    """`stats` plus the reservations whose KV is in flight and the measured pace of a prompt prefilled here:
    alone (prefill-only steps) and beside the sequences running now (the split-fused credit's pace for that
    batch; a prompt placed now would decode beside them). 0.0 where nothing was measured yet."""
    alone = beside = 0.0
    if step_cost is not None:
        alone = step_cost.prefill_only_s_per_token
        beside = step_cost.fused_prefill_s_per_token(max(1, stats.num_running - awaiting_kv)) or 0.0
    return dataclasses.replace(stats, num_awaiting_kv=awaiting_kv, prefill_s_per_token=alone,
                               fused_prefill_s_per_token=beside)
