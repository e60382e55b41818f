"""The CPU kernel tests set torch's thread count per case: each gets the count it started with back."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
