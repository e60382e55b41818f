"""Launch configuration of the skinny GEMM (kernels/linear/kernel.py): tiles per weight shape (H100-tuned)."""
from __future__ import annotations

from dataclasses import dataclass, replace

SKINNY_MAX_M = 16
SHARED_MEMORY_BUDGET = 160 * 1024  # bytes of pipelined tiles a program (H100: 227 KB a block, less scratch)


@dataclass(frozen=True)
class SkinnyConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int = 1


# Tuned on an H100 (bench/linear_gpu.py) at the Llama-3-8B shapes; keys: (rows <= 1, N, K). Shapes not listed
# use _DEFAULT_*. Any config is correct for any shape: this table only picks speed.
_TUNED: dict[tuple[bool, int, int], SkinnyConfig] = {
    # one row: (4, 2048, 8 warps) led at every shape (2-6% over the next config, 5-11% over cuBLAS)
    # up to 16 rows (tl.dot, weight tile on the left), per shape:
    (False, 6144, 4096): SkinnyConfig(64, 128, 4, 5),
    (False, 4096, 4096): SkinnyConfig(64, 256, 4, 5),
    (False, 28672, 4096): SkinnyConfig(64, 128, 4, 5),
    (False, 4096, 14336): SkinnyConfig(64, 256, 4, 5),
    (False, 128256, 4096): SkinnyConfig(64, 256, 4, 5),
}
_DEFAULT_ONE_ROW = SkinnyConfig(block_n=4, block_k=2048, num_warps=8, num_stages=1)
_DEFAULT_FEW_ROWS = SkinnyConfig(block_n=64, block_k=128, num_warps=4, num_stages=5)


def pick_config(m: int, n: int, k: int) -> SkinnyConfig:
    one_row = m == 1
    config = _TUNED.get((one_row, n, k), _DEFAULT_ONE_ROW if one_row else _DEFAULT_FEW_ROWS)
    block_k = config.block_k
    while k % (config.split_k * block_k) and block_k > 16:
        block_k //= 2  # small models (SmolLM2: K = 576) get K tiles that divide K, rows widened to match
    if block_k == config.block_k:
        return config
    return replace(config, block_k=block_k, block_n=min(64, config.block_n * config.block_k // block_k))
