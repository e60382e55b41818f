"""Every GPU benchmark, started on a machine without CUDA, says so by name and exits 2 (no traceback)."""
from __future__ import annotations

import importlib

import pytest
import torch

GPU_BENCHES = ("attention_splits_gpu", "decode_gpu", "decode_gpu_ablate", "decode_gpu_profile",
               "gemm_variants_gpu", "kernels_gpu", "linear_gpu", "nccl_one_gpu_check")


@pytest.mark.parametrize("name", GPU_BENCHES)
def test_without_cuda_a_gpu_bench_says_so_and_exits_2(name: str, capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the bench would run")
    bench = importlib.import_module(f"bench.{name}")
    assert bench.main([]) == 2
    assert capsys.readouterr().err.strip() == f"bench/{name}.py needs a CUDA device"
