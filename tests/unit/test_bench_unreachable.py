"""`pdserve bench` against an address nothing listens on exits non-zero with one line naming it."""

from __future__ import annotations

import pytest

from deploy import cli

pytestmark = pytest.mark.timeout(60)


def test_bench_with_no_router_exits_nonzero_naming_the_address(capsys) -> None:
    # was: `statuses {'UNAVAILABLE': 2}`, an empty latency table and exit 0
    rc = cli.main(["bench", "--address", "127.0.0.1:1", "--num-requests", "2", "--rate", "4",
                   "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert err.strip().splitlines() == [
        "pdserve bench: error: every request failed UNAVAILABLE: the router at 127.0.0.1:1 is unreachable "
        "or has no worker ready (is `pdserve up` running?)"]
    assert "statuses" not in out


def test_a_sweep_with_no_router_stops_at_its_first_probe(capsys) -> None:
    rc = cli.main(["bench", "--address", "127.0.0.1:1", "--num-requests", "2", "--no-progress",
                   "--slo-ttft", "1", "--slo-tpot", "0.1", "--sweep", "2:8"])
    out, err = capsys.readouterr()
    assert rc == 1 and "127.0.0.1:1 is unreachable" in err
    assert "goodput" not in out
