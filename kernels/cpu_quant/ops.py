"""Q4_1 / Q8_0 weights × fp32 activations on CPU via cpu_quant.c; prefill-sized inputs dequantize + GEMM."""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from kernels.cpu_quant.layout import QK, Q41Weight, Q80Weight
from kernels.cpu_quant.library import library

TILE_ROWS = 8  # activation rows per weight pass (cpu_quant.c takes at most 8)
# Above this many rows a product dequantizes the weight to fp32 once and runs torch's GEMM: a pass per 8
# rows re-reads (and re-dequantizes) the whole weight, which stops paying off past a few passes.
MAX_TILED_ROWS = 32


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    if x.device.type != "cpu":
        raise ValueError(f"kernels/cpu_quant runs on CPU tensors, got {x.device}")
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features, the weight {k}")
    return x.reshape(-1, k).float().contiguous()


def _is_tile(x: torch.Tensor, k: int) -> bool:
    """x is already one kernel tile ([≤ 8, K] contiguous fp32 on CPU): bs1 decode and verify steps, where
    the few microseconds of reshaping are a visible share of a ~50 µs product."""
    return (x.dim() == 2 and x.is_cpu and x.dtype is torch.float32 and x.shape[0] <= TILE_ROWS
            and x.shape[1] == k and x.is_contiguous())


def _tiled(x: torch.Tensor, k: int, n: int, kernel: Callable[..., None], args: tuple[int, ...],
           dequantized: Callable[[], torch.Tensor]) -> torch.Tensor:
    """x [..., K] → float32 [..., N] by `kernel(x_ptr, rows, *args, out_ptr, threads)` over tiles of
    ≤ TILE_ROWS rows; more than MAX_TILED_ROWS rows multiply the `dequantized()` weight in torch's GEMM."""
    threads = torch.get_num_threads()
    if _is_tile(x, k):
        out = torch.empty(x.shape[0], n)
        kernel(x.data_ptr(), x.shape[0], *args, out.data_ptr(), threads)
        return out
    rows = _rows(x, k)
    if rows.shape[0] > MAX_TILED_ROWS:
        out = F.linear(rows, dequantized())
    else:
        out = torch.empty(rows.shape[0], n)
        for start in range(0, rows.shape[0], TILE_ROWS):
            xt, yt = rows[start:start + TILE_ROWS], out[start:start + TILE_ROWS]
            kernel(xt.data_ptr(), xt.shape[0], *args, yt.data_ptr(), threads)
    return out.view(*x.shape[:-1], n)


def q4_1_linear(x: torch.Tensor, weight: Q41Weight) -> torch.Tensor:
    """x [..., K] → float32 [..., N] = x · (d·q + m)ᵀ; fp32 activations and accumulation."""
    n, k = weight.d.shape[0], weight.d.shape[1] * QK
    args = (k, weight.packed.data_ptr(), weight.d.data_ptr(), weight.m.data_ptr(), n)
    return _tiled(x, k, n, library().q4_1_linear, args, partial(dequantize_q4_1, weight))


def q8_0_linear(x: torch.Tensor, weight: Q80Weight) -> torch.Tensor:
    """x [..., K] → float32 [..., N] = x · (d·q)ᵀ; fp32 activations and accumulation."""
    n, k = weight.q.shape
    args = (k, weight.q.data_ptr(), weight.d.data_ptr(), n)
    return _tiled(x, k, n, library().q8_0_linear, args, partial(dequantize_q8_0, weight))


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
