"""Options of the soak runs: their size (`pytest tests/soak --soak-requests 200` for a shorter run)."""
from __future__ import annotations

import pytest

DEFAULT_REQUESTS = 2000


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak-requests", type=int, default=DEFAULT_REQUESTS,
                     help=f"requests in the cluster soak's main run (default {DEFAULT_REQUESTS})")


@pytest.fixture(scope="session")
def soak_requests(pytestconfig: pytest.Config) -> int:
    # `pytest -m soak` from the root registers this conftest after the command line was parsed: the default.
    return int(pytestconfig.getoption("soak_requests", default=DEFAULT_REQUESTS))
