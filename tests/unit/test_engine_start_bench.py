"""bench.engine.engine_start: a bad flag value is a usage error naming the flag; a run writes a row a pair."""
from __future__ import annotations

import json
import sys

import pytest

from bench.engine import engine_start

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize(("flags", "flag"), [
    (["--runs", "0"], "--runs"), (["--threads", "0"], "--threads"), (["--kv-cache", "int3"], "--kv-cache"),
    (["--weights", "bf16"], "--weights"),
])
def test_a_bad_flag_value_is_a_usage_error_naming_the_flag(flags, flag, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["engine_start", *flags])
    with pytest.raises(SystemExit) as e:
        engine_start.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and flag in err and "Traceback" not in err


def test_a_run_times_every_pair_and_writes_its_rows(tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "start.json"
    monkeypatch.setattr(sys, "argv", ["engine_start", "--kv-cache", "float32", "int8", "--runs", "2",
                                      "--json", str(out)])
    engine_start.main()
    rows = json.loads(out.read_text())["rows"]
    assert [(r["weights"], r["kv_cache"]) for r in rows] == [("auto", "float32"), ("auto", "int8")]
    for row in rows:
        assert len(row["seconds"]) == 2 and all(s > 0 for s in row["seconds"])
        assert row["best"] == min(row["seconds"]) and min(row["seconds"]) <= row["median"]
    assert "kv-cache int8" in capsys.readouterr().out
