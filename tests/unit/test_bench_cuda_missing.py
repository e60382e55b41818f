"""Every GPU benchmark, started on a machine without CUDA, says so by its path and exits 2 (no traceback)."""
from __future__ import annotations

import importlib

import pytest
import torch

GPU_BENCHES = ("engine.decode_gpu", "engine.decode_gpu_profile", "kernels.kernels_gpu", "kernels.linear_gpu")


@pytest.mark.parametrize("name", GPU_BENCHES)
def test_without_cuda_a_gpu_bench_says_so_and_exits_2(name: str, capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the bench would run")
    bench = importlib.import_module(f"bench.{name}")
    assert bench.main([]) == 2
    assert capsys.readouterr().err.strip() == f"bench/{name.replace('.', '/')}.py needs a CUDA device"
