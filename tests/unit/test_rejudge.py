"""A compare run's probes judged again at another TPOT SLO: attainment, goodput, the ratio to the first."""
from __future__ import annotations

import json
from pathlib import Path

from bench.serving.metrics import Slo
from bench.serving.rejudge import attainment, main, rejudged_goodput


def _records(tpots: list[float]) -> list[dict]:
    return [{"index": i, "warmup": False, "sent_at": 0.0, "status": "OK", "prompt_tokens": 8,
             "output_tokens": 4, "ttft": 1.0, "tpot": t, "e2e": 1.2, "max_itl": None}
            for i, t in enumerate(tpots)]


def _result(label: str, tpot_by_rate: dict[float, float]) -> dict:
    probes = [{"rate": rate, "records": _records([t] * 9 + [0.01])} for rate, t in tpot_by_rate.items()]
    return {"label": label, "config": {"slo_ttft": 2.0, "slo_tpot": 0.1, "slo_target": 0.9},
            "sweep": {"goodput_rps": max(tpot_by_rate), "probes": probes}}


def test_a_probe_passes_at_a_tpot_slo_its_requests_meet() -> None:
    records = _records([0.04, 0.05, 0.06])
    assert attainment(records, Slo(2.0, 0.055)) == 2 / 3
    assert attainment(records + [{**records[0], "warmup": True, "tpot": 1.0}], Slo(2.0, 0.055)) == 2 / 3


def test_goodput_is_the_highest_probe_with_every_lower_one_passing(tmp_path: Path, capsys) -> None:
    coloc = _result("colocated", {0.3: 0.04, 0.6: 0.05, 0.9: 0.045})
    cond = _result("conditional", {0.3: 0.04, 0.6: 0.045, 0.9: 0.045})
    assert rejudged_goodput(coloc, Slo(2.0, 0.048), 0.9) == 0.3  # 0.9 passes, but 0.6 below it fails
    assert rejudged_goodput(cond, Slo(2.0, 0.048), 0.9) == 0.9
    path = tmp_path / "run.json"
    path.write_text(json.dumps([coloc, cond]))
    main([str(path), "--tpot", "0.048"])
    assert capsys.readouterr().out.strip() == (
        "TPOT 48.0 ms, TTFT 2000 ms: colocated 0.300; conditional 0.900 (3.00x)")
