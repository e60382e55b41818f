"""Q4_1 / Q8_0 weights × fp32 activations on CPU through cpu_quant.c; rows tiled or dequantized for prefill."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from kernels.cpu_quant.layout import Q41Weight, Q80Weight
from kernels.cpu_quant.library import library

TILE_ROWS = 8  # activation rows per weight pass (cpu_quant.c's ROWS_MAX)
# Above this many rows a product dequantizes the weight to fp32 once and runs torch's GEMM: a pass per 8
# rows re-reads (and re-dequantizes) the whole weight, which stops paying off past a few passes.
MAX_TILED_ROWS = 32


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    if x.device.type != "cpu":
        raise ValueError(f"kernels/cpu_quant runs on CPU tensors, got {x.device}")
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features, the weight {k}")
    return x.reshape(-1, k).float().contiguous()


def _tiled(rows: torch.Tensor, n: int, call: Callable[[torch.Tensor, torch.Tensor], None]) -> torch.Tensor:
    """out [M, N], `call(x_tile, out_tile)` once per tile of ≤ TILE_ROWS rows (out tiles are row blocks)."""
    out = torch.empty(rows.shape[0], n)
    for start in range(0, rows.shape[0], TILE_ROWS):
        call(rows[start:start + TILE_ROWS], out[start:start + TILE_ROWS])
    return out


def q4_1_linear(x: torch.Tensor, weight: Q41Weight) -> torch.Tensor:
    """x [..., K] → float32 [..., N] = x · (d·q + m)ᵀ; fp32 activations and accumulation."""
    n, k = weight.shape
    rows = _rows(x, k)
    threads = torch.get_num_threads()
    if rows.shape[0] > MAX_TILED_ROWS:
        out = F.linear(rows, dequantize_q4_1(weight))
    else:
        lib = library()
        out = _tiled(rows, n, lambda xt, yt: lib.q4_1_linear(
            xt.data_ptr(), xt.shape[0], k, weight.packed.data_ptr(), weight.d.data_ptr(), weight.m.data_ptr(),
            n, yt.data_ptr(), threads))
    return out.view(*x.shape[:-1], n)


def q8_0_linear(x: torch.Tensor, weight: Q80Weight) -> torch.Tensor:
    """x [..., K] → float32 [..., N] = x · (d·q)ᵀ; fp32 activations and accumulation."""
    n, k = weight.shape
    rows = _rows(x, k)
    threads = torch.get_num_threads()
    if rows.shape[0] > MAX_TILED_ROWS:
        out = F.linear(rows, dequantize_q8_0(weight))
    else:
        lib = library()
        out = _tiled(rows, n, lambda xt, yt: lib.q8_0_linear(
            xt.data_ptr(), xt.shape[0], k, weight.q.data_ptr(), weight.d.data_ptr(), n, yt.data_ptr(), threads))
    return out.view(*x.shape[:-1], n)


def dequantize_q4_1(weight: Q41Weight) -> torch.Tensor:
    """float32 [N, K] = d·q + m (bit for bit the reference's: d·q is exact in fp32)."""
    n, k = weight.shape
    out = torch.empty(n, k)
    library().q4_1_dequantize(weight.packed.data_ptr(), weight.d.data_ptr(), weight.m.data_ptr(), n, k,
                              out.data_ptr(), torch.get_num_threads())
    return out


def dequantize_q8_0(weight: Q80Weight) -> torch.Tensor:
    n, k = weight.shape
    out = torch.empty(n, k)
    library().q8_0_dequantize(weight.q.data_ptr(), weight.d.data_ptr(), n, k, out.data_ptr(),
                              torch.get_num_threads())
    return out
