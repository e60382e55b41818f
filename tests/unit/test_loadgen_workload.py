"""pdserve bench's inputs: seeded arrivals at their rate, deterministic workloads, traces, loopback only."""
from __future__ import annotations

import json
import statistics

import pytest

from bench.serving.arrivals import arrival_offsets
from bench.serving.loopback import NonLoopbackTarget, check_loopback
from bench.serving.trace import TraceError, load_trace
from bench.serving.workload import SharedPrefix, WorkloadSpec, parse_length, synthesize


def test_poisson_arrivals_are_seeded_and_hold_the_rate_with_exponential_gaps() -> None:
    rate, n = 4.0, 20000
    offsets = arrival_offsets("poisson", rate, n, seed=3)
    assert offsets == arrival_offsets("poisson", rate, n, seed=3)
    assert offsets != arrival_offsets("poisson", rate, n, seed=4)
    assert offsets[0] == 0.0 and offsets == sorted(offsets)
    gaps = [b - a for a, b in zip(offsets, offsets[1:], strict=False)]
    assert (n - 1) / offsets[-1] == pytest.approx(rate, rel=0.03)
    # Exponential gaps: the standard deviation equals the mean (a constant process would have 0).
    assert statistics.stdev(gaps) == pytest.approx(statistics.mean(gaps), rel=0.05)


def test_constant_arrivals_are_evenly_spaced() -> None:
    assert arrival_offsets("constant", 4.0, 5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError, match="rate"):
        arrival_offsets("constant", 0.0, 5)
    with pytest.raises(ValueError, match="poisson"):
        arrival_offsets("bursty", 1.0, 5)


def test_length_specs_parse_and_reject_bad_forms() -> None:
    assert str(parse_length("fixed:128")) == "fixed:128"
    assert str(parse_length("uniform:8:64")) == "uniform:8:64"
    assert str(parse_length("chat:200:2000")) == "chat:200:2000"
    for bad in ("fixed", "fixed:0", "uniform:64:8", "chat:5", "gauss:1:2", "fixed:x"):
        with pytest.raises(ValueError, match="fixed:N"):
            parse_length(bad)


def test_synthesized_workload_is_deterministic_and_within_its_length_bounds() -> None:
    spec = WorkloadSpec(num_requests=300, prompt_len=parse_length("uniform:8:64"),
                        output_len=parse_length("chat:40:400"), seed=11)
    requests = synthesize(spec)
    assert requests == synthesize(spec)
    assert requests != synthesize(WorkloadSpec(**{**spec.__dict__, "seed": 12}))
    assert all(8 <= r.prompt_tokens <= 64 for r in requests)
    assert all(1 <= r.max_tokens <= 400 for r in requests)
    assert all(spec.token_range[0] <= t < spec.token_range[1] for r in requests for t in r.prompt_ids)
    outputs = sorted(r.max_tokens for r in requests)
    assert 30 <= outputs[len(outputs) // 2] <= 55  # chat: the median sits near 40 ...
    assert outputs[-1] > 3 * 40  # ... with a long tail


def test_shared_prefix_workload_gives_each_user_its_system_prompt() -> None:
    spec = WorkloadSpec(num_requests=12, prompt_len=parse_length("fixed:5"),
                        output_len=parse_length("fixed:3"),
                        shared_prefix=SharedPrefix(systems=2, users=3, prefix_len=20))
    requests = synthesize(spec)
    prefixes = {r.prompt_ids[:20] for r in requests}
    assert len(prefixes) == 2 and all(r.prompt_tokens == 25 for r in requests)
    assert len({r.prompt_ids for r in requests}) == 6  # 2 systems x 3 users, then the users come back
    assert requests[:6] == requests[6:]


def test_trace_replays_sorted_offsets_from_zero_with_ids_or_text(tmp_path) -> None:
    path = tmp_path / "trace.jsonl"
    rows = [{"t": 12.5, "text": "hello", "max_tokens": 4},
            {"t": 10.0, "prompt_ids": [5, 6, 7], "max_tokens": 2}]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")  # a blank line is skipped
    offsets, requests = load_trace(path)
    assert offsets == [0.0, 2.5]
    assert requests[0].prompt_ids == (5, 6, 7) and requests[0].max_tokens == 2
    assert requests[1].text == "hello" and requests[1].prompt_tokens == 0


@pytest.mark.parametrize("line,message", [
    ('{"t": 1, "max_tokens": 4}', "exactly one"),
    ('{"t": 1, "text": "a", "prompt_ids": [1], "max_tokens": 4}', "exactly one"),
    ('{"text": "a", "max_tokens": 4}', "'t'"),
    ('not json', "'t'"),
    ('{"t": 1, "text": "a", "max_tokens": 0}', "max_tokens"),
])
def test_trace_errors_name_the_line(tmp_path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"t": 0, "text": "ok", "max_tokens": 1}\n' + line + "\n")
    with pytest.raises(TraceError, match=f"bad.jsonl:2.*{message}"):
        load_trace(path)


@pytest.mark.parametrize("address", ["127.0.0.1:50051", "127.8.9.10:1", "localhost:50051", "LOCALHOST:1",
                                     "[::1]:50051"])
def test_loopback_targets_are_accepted(address: str) -> None:
    check_loopback(address)


@pytest.mark.parametrize("address", ["10.0.0.1:50051", "0.0.0.0:50051", "example.com:443", "[::]:50051",
                                     "192.168.1.2:1", "[2001:db8::1]:50051", "128.0.0.1:80"])
def test_non_loopback_targets_are_refused_with_a_clear_message(address: str) -> None:
    with pytest.raises(NonLoopbackTarget, match="only targets this machine"):
        check_loopback(address)
