"""bench/decode_gpu_ablate.py's variants apply what they name and undo all of it (the bench runs on a GPU)."""
from __future__ import annotations

import os

import pytest

pytest.importorskip("triton")

import kernels.triton_attention as attention  # noqa: E402
import kernels.triton_linear as linear  # noqa: E402
import kernels.triton_rmsnorm as rmsnorm  # noqa: E402
from bench import decode_gpu_ablate  # noqa: E402
from kernels import dispatch  # noqa: E402
from kernels.triton_registry import register_triton_kernels  # noqa: E402


def test_a_combined_variant_patches_while_active_and_restores_everything() -> None:
    register_triton_kernels()
    before = (dict(linear._TUNED), attention.choose_num_splits, attention.decode_config,
              rmsnorm.rms_norm_and_residual_triton, dispatch._REGISTRY["paged_attention"][dispatch.TRITON],
              os.environ.get("PDSERVE_MERGE_IN_PLACE"))
    name = "noattn+nonorm+nomip+splits3+attn32x4x2+T4096_4096_64x128x4x4+T999_64_16x16x1x1"
    with decode_gpu_ablate.variant(name):
        assert attention.choose_num_splits(16, 8, 512, None) == 3
        assert attention.decode_config(128, False, 1, None) == (32, 4, 2)
        assert linear._TUNED[(False, 4096, 4096)] == linear.SkinnyConfig(64, 128, 4, 4)
        assert linear._TUNED[(False, 999, 64)] == linear.SkinnyConfig(16, 16, 1, 1)
        assert os.environ["PDSERVE_MERGE_IN_PLACE"] == "0"
        assert dispatch._REGISTRY["paged_attention"][dispatch.TRITON]("q", "k", "v", "meta", 1.0) == "q"
        assert rmsnorm.rms_norm_and_residual_triton("x", "w", 1e-5, "r") == ("x", "r")
    after = (dict(linear._TUNED), attention.choose_num_splits, attention.decode_config,
             rmsnorm.rms_norm_and_residual_triton, dispatch._REGISTRY["paged_attention"][dispatch.TRITON],
             os.environ.get("PDSERVE_MERGE_IN_PLACE"))
    assert after == before


def test_an_unknown_variant_is_refused_by_name_and_undoes_the_parts_before_it() -> None:
    before = attention.choose_num_splits
    with pytest.raises(SystemExit, match="'nosuch'"), decode_gpu_ablate.variant("splits2+nosuch"):
        pass
    assert attention.choose_num_splits is before

