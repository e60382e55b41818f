"""`pdserve bench` against the real cluster: a few seconds at a low rate, every request streamed and timed."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def test_pdserve_bench_writes_a_complete_json_report(cluster, tmp_path) -> None:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "deploy.cli", "bench", "--address", cluster.address, "--rate", "1",
           "--arrival", "constant", "--num-requests", "5", "--warmup", "1", "--duration", "120",
           "--prompt-len", "fixed:16", "--output-len", "fixed:8", "--slo-ttft", "30", "--slo-tpot", "5",
           "--json", str(out), "--no-progress", "--label", "e2e"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    run = result["run"]
    assert run["requests"] == 4 and run["statuses"] == {"OK": 4} and run["not_sent"] == 0
    for r in result["records"]:
        assert (r["status"], r["prompt_tokens"], r["output_tokens"]) == ("OK", 16, 8)
        assert 0 < r["ttft"] < r["e2e"] and r["tpot"] > 0
    assert 0 < run["ttft_s"]["p50"] <= run["ttft_s"]["p99"] < run["e2e_s"]["p99"]
    assert run["output_token_throughput"] > 0 and run["slo_attainment"] == 1.0
    assert "tpot" in done.stdout
