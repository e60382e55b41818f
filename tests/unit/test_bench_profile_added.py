"""The decode profile's per-kernel attribution: each kernel's time past every kernel before it."""
from __future__ import annotations

from bench.engine.decode_gpu_profile import added_us, busy_ms


def test_overlapping_kernels_add_only_their_time_past_the_one_before() -> None:
    # a PDL launch: the second kernel starts at 5 while the first runs to 10, and ends at 14
    assert added_us([(0.0, 10.0), (5.0, 14.0)]) == [10.0, 4.0]


def test_gaps_are_not_charged_and_a_kernel_inside_another_adds_nothing() -> None:
    intervals = [(0.0, 10.0), (2.0, 6.0), (20.0, 25.0), (24.0, 30.0)]
    added = added_us(intervals)
    assert added == [10.0, 0.0, 5.0, 5.0]
    assert sum(added) / 1e3 == busy_ms(intervals)  # the union: what the step kept the GPU busy
