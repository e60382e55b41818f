"""The router process and the client never import torch (checked in a fresh interpreter)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("module", ["router.server", "deploy.client"])
def test_module_imports_without_torch(module: str) -> None:
    # A fresh interpreter: this test process has long imported torch through other tests.
    probe = f"import sys, {module}; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False", f"importing {module} pulled in torch"
