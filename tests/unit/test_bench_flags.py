"""`pdserve bench` refuses a bad flag value by name before it loads anything (no traceback, no silent run)."""

from __future__ import annotations

import pytest

from deploy import cli

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(("flags", "flag"), [
    (["--rate", "nan"], "--rate"),  # was accepted: a run of nan-spaced arrivals
    (["--duration", "inf"], "--duration"),
    (["--slo-target", "2"], "--slo-target"),  # was accepted: goodput against an unreachable share
    (["--sweep-probes", "0"], "--sweep-probes"),  # was accepted
    (["--sweep-tol", "-1"], "--sweep-tol"),
    (["--trace", "/nonexistent/trace.jsonl"], "--trace"),  # was a FileNotFoundError traceback
])
def test_a_bad_bench_flag_value_is_a_usage_error_naming_the_flag(flags, flag, capsys) -> None:
    with pytest.raises(SystemExit) as e:  # argparse's error: usage + message, exit 2
        cli.main(["bench", "--address", "127.0.0.1:1", "--no-progress", *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {flag}:" in err and "Traceback" not in err
