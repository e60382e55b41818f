"""register_triton_kernels puts each Triton kernel under dispatch.TRITON, idempotently; torch off CUDA."""
from __future__ import annotations

import logging
import sys

import pytest
import torch

from kernels import dispatch, triton_registry

pytestmark = pytest.mark.timeout(60)


def test_every_op_gets_a_triton_and_a_torch_backend() -> None:
    triton_registry.register_triton_kernels()
    for op in ("paged_attention", "store_kv", "rms_norm", "apply_rotary"):
        assert set(dispatch.backends(op)) >= {dispatch.TORCH, dispatch.TRITON}


def test_registering_twice_keeps_the_same_functions() -> None:
    triton_registry.register_triton_kernels()
    first = {op: dispatch.lookup(op, torch.device("cuda")) for op in triton_registry.TRITON_KERNELS}
    triton_registry.register_triton_kernels()
    second = {op: dispatch.lookup(op, torch.device("cuda")) for op in triton_registry.TRITON_KERNELS}
    assert first == second
    assert second["rms_norm"].__name__ == "rms_norm_triton"


def test_cpu_lookup_still_returns_the_torch_reference() -> None:
    triton_registry.register_triton_kernels()
    assert dispatch.lookup("paged_attention", torch.device("cpu")).__name__ == "paged_attention_ref"


def test_missing_triton_logs_once_and_registers_nothing(monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    registered: list[str] = []
    monkeypatch.setattr(dispatch, "register", lambda op, backend: registered.append(op))
    monkeypatch.setattr(triton_registry, "_warned_unavailable", False)
    with caplog.at_level(logging.INFO, logger=triton_registry.__name__):
        triton_registry.register_triton_kernels()
        triton_registry.register_triton_kernels()
    assert registered == []
    assert sum("triton unavailable" in r.getMessage() for r in caplog.records) == 1
