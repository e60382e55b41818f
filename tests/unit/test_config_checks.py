"""The configs' shared field checks: the message names the field, and EngineConfig and SchedulerConfig refuse
the same fair-prefill values (one check serves both)."""
from __future__ import annotations

import re

import pytest

from engine.config import EngineConfig
from engine.scheduler_types import SchedulerConfig
from router.config import RouterConfig


@pytest.mark.parametrize(("fields", "message"), [
    ({"long_prefill_token_threshold": -1}, "long_prefill_token_threshold must be >= 0, got -1"),
    ({"max_long_partial_prefills": 0}, "max_long_partial_prefills must be >= 1, got 0"),
    ({"fused_step_max_slowdown": 0.5}, "fused_step_max_slowdown must be 0 (off) or > 1, got 0.5"),
])
def test_engine_and_scheduler_configs_refuse_the_same_prefill_fairness(fields, message) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        EngineConfig(**fields)
    with pytest.raises(ValueError, match=re.escape(message)):
        SchedulerConfig(max_batch_tokens=8, max_num_seqs=2, block_size=4, max_model_len=64, **fields)


@pytest.mark.parametrize(("fields", "message"), [
    ({"queue_capacity": -1}, "queue_capacity must be >= 0, got -1"),
    ({"max_stop_chars": 0}, "max_stop_chars must be >= 1, got 0"),
    ({"worker_refresh_s": 0.0}, "worker_refresh_s must be > 0, got 0.0"),
])
def test_router_config_names_the_bad_field(fields, message) -> None:
    with pytest.raises(ValueError, match=message):
        RouterConfig(**fields)
