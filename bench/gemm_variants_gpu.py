"""Why the multi-row skinny GEMM streams slower than the one-row GEMV: other kernels, side by side.

Run on a CUDA machine from the repo root: `python -m bench.gemm_variants_gpu [--rows 16] [--shapes ...]`.
For each Llama-3-8B decode shape, GB/s of weight read (graph replay over weight copies, as linear_gpu.py)
of: the one-row GEMV (kernels/triton_linear.py at 1 row: the bandwidth a decode linear can reach); the
shipped multi-row kernel (weight tile on the left of tl.dot); cuBLAS; and the best config of each
alternative family below at the same row count. Families:
  x_left   x on the left of tl.dot (the shipped kernel before swap-AB);
  tma      weight and x tiles through TMA descriptors, with and without Triton's warp specialization;
  persist  one program per SM slot walking its tiles in one flattened, pipelined K loop;
  partials split-K writing fp32 partials for the consumer to sum (the sum is not timed: a lower bound);
  cores    CUDA-core multiply-adds for every row (the one-row design widened; only up to 8 rows).
"""
from __future__ import annotations

import argparse
import itertools
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from bench._cuda import cuda_missing
from bench.linear_gpu import SHAPES, graph_ms


@triton.jit
def _x_left_kernel(x_ptr, w_ptr, out_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
    x_ptrs = x_ptr + offs_m[:, None] * K + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for _ in range(0, K, BLOCK_K):
        w = tl.load(w_ptrs, eviction_policy="evict_first")
        acc = tl.dot(tl.load(x_ptrs, mask=offs_m[:, None] < M, other=0.0), tl.trans(w), acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _tma_kernel(x_desc, w_desc, out_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, STAGES: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
    n0 = tl.program_id(0) * BLOCK_N
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    for k in tl.range(0, K, BLOCK_K, num_stages=STAGES, warp_specialize=WARP_SPECIALIZE):
        acc = tl.dot(w_desc.load([n0, k]), tl.trans(x_desc.load([0, k])), acc)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    tl.store(out_ptr + offs_m[None, :] * N + offs_n[:, None], acc.to(out_ptr.dtype.element_ty),
             mask=(offs_m[None, :] < M) & (offs_n[:, None] < N))


@triton.jit
def _persist_kernel(x_ptr, w_ptr, out_ptr, M, N, K, NUM_TILES, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    k_steps = K // BLOCK_K
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m[None, :] < M
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    tile = pid
    ki = -1
    for step in tl.range(0, tl.cdiv(NUM_TILES - pid, nprog) * k_steps, num_stages=STAGES):
        ki = tl.where(ki == k_steps - 1, 0, ki + 1)
        if ki == 0:
            tile = tl.where(step == 0, pid, tile + nprog)
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * K + ki * BLOCK_K + offs_k[None, :],
                    eviction_policy="evict_first")
        xt = tl.load(x_ptr + offs_m[None, :] * K + ki * BLOCK_K + offs_k[:, None], mask=m_mask, other=0.0)
        acc = tl.dot(w, xt, acc)
        if ki == k_steps - 1:
            tl.store(out_ptr + offs_m[None, :] * N + offs_n[:, None], acc.to(out_ptr.dtype.element_ty),
                     mask=m_mask & (offs_n[:, None] < N))
            acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)


@triton.jit
def _partials_kernel(x_ptr, w_ptr, ws_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_k = tl.program_id(1)
    k_per = K // SPLIT_K
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = pid_k * k_per + tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
    x_ptrs = x_ptr + offs_m[None, :] * K + offs_k[:, None]
    m_mask = offs_m[None, :] < M
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    for _ in range(0, k_per, BLOCK_K):
        w = tl.load(w_ptrs, eviction_policy="evict_first")
        acc = tl.dot(w, tl.load(x_ptrs, mask=m_mask, other=0.0), acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    tl.store(ws_ptr + (pid_k * M + offs_m[None, :]) * N + offs_n[:, None], acc,
             mask=m_mask & (offs_n[:, None] < N))


@triton.jit
def _cores_kernel(x_ptr, w_ptr, out_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
    x_ptrs = x_ptr + offs_m[:, None] * K + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for _ in range(0, K, BLOCK_K):
        w = tl.load(w_ptrs, eviction_policy="evict_first").to(tl.float32)
        x = tl.load(x_ptrs, mask=offs_m[:, None] < M, other=0.0).to(tl.float32)
        acc += tl.sum(w[None, :, :] * x[:, None, :], axis=2)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def families(x: torch.Tensor, weights: list[torch.Tensor], out: torch.Tensor, ws: torch.Tensor):
    """(family, fn(i) running the candidate on weight copy i, reader of its result) for every candidate."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    m, k = x.shape
    n = weights[0].shape[0]
    bm = max(16, triton.next_power_of_2(m))
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    tiles = triton.cdiv(n, 64)

    def plain() -> torch.Tensor:
        return out

    for bk, stages in itertools.product((128, 256), (3, 5)):
        def x_left(i, bk=bk, stages=stages):
            _x_left_kernel[(triton.cdiv(n, 32),)](x, weights[i], out, m, n, k, BLOCK_M=bm, BLOCK_N=32,
                                                  BLOCK_K=bk, num_warps=4, num_stages=stages)
        yield "x_left", x_left, plain
    for bk, stages, spec in itertools.product((128, 256), (4, 5), (False, True)):
        descs = [TensorDescriptor(w, [n, k], [k, 1], [64, bk]) for w in weights]
        x_desc = TensorDescriptor(x, [m, k], [k, 1], [bm, bk])

        def tma(i, bk=bk, stages=stages, spec=spec, descs=descs, x_desc=x_desc):
            _tma_kernel[(tiles,)](x_desc, descs[i], out, m, n, k, BLOCK_M=bm, BLOCK_N=64, BLOCK_K=bk,
                                  STAGES=stages, WARP_SPECIALIZE=spec, num_warps=4)
        yield "tma", tma, plain
    for bk, per_sm in itertools.product((128, 256), (1, 2)):
        grid = min(tiles, sms * per_sm)

        def persist(i, bk=bk, grid=grid):
            _persist_kernel[(grid,)](x, weights[i], out, m, n, k, tiles, BLOCK_M=bm, BLOCK_N=64, BLOCK_K=bk,
                                     STAGES=4, num_warps=4)
        yield "persist", persist, plain
    for split in (2, 4):
        def partials(i, split=split):
            _partials_kernel[(tiles, split)](x, weights[i], ws, m, n, k, BLOCK_M=bm, BLOCK_N=64, BLOCK_K=128,
                                             SPLIT_K=split, num_warps=4, num_stages=5)
        yield "partials", partials, lambda split=split: ws[:split * m * n].view(split, m, n).sum(0)
    if m <= 8:
        bm_cores = triton.next_power_of_2(m)
        for bn, bk in ((4, 2048), (4, 512)):
            def cores(i, bn=bn, bk=bk):
                _cores_kernel[(triton.cdiv(n, bn),)](x, weights[i], out, m, n, k, BLOCK_M=bm_cores,
                                                     BLOCK_N=bn, BLOCK_K=bk, num_warps=4)
            yield "cores", cores, plain


def time_shape(name: str, rows: int) -> str:
    """One output line: GB/s of the one-row GEMV, the shipped kernel, cuBLAS and each family's best."""
    from kernels.triton_linear import linear_triton

    n, k = SHAPES[name]
    nbytes = n * k * 2
    copies = max(2, -(-(512 << 20) // nbytes))  # >= 512 MB per graph: nothing stays in L2
    weights = [torch.empty(n, k, dtype=torch.bfloat16, device="cuda").normal_(std=0.02)
               for _ in range(copies)]
    x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda")
    one_row = x[:1].clone()
    ref = F.linear(x, weights[0]).float()
    out = torch.empty(rows, n, dtype=torch.bfloat16, device="cuda")
    ws = torch.empty(4 * rows * n, dtype=torch.float32, device="cuda")
    best = {"one-row GEMV": graph_ms(lambda i: linear_triton(one_row, weights[i]), copies),
            "shipped": graph_ms(lambda i: linear_triton(x, weights[i]), copies),
            "cuBLAS": graph_ms(lambda i: F.linear(x, weights[i]), copies)}
    for family, fn, result in families(x, weights, out, ws):
        try:
            fn(0)
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - a variant this GPU/Triton cannot build: say so, go on
            print(f"  {name} {family}: {type(exc).__name__}", flush=True)
            continue
        if not torch.allclose(result().float(), ref, atol=3e-2, rtol=3e-2):
            print(f"  {name} {family}: WRONG", flush=True)
            continue
        best[family] = min(best.get(family, float("inf")), graph_ms(fn, copies))
    return f"{name:8s} " + " | ".join(f"{fam} {nbytes / ms / 1e6:5.0f}" for fam, ms in best.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    args = parser.parse_args(argv)
    if cuda_missing(__file__):
        return 2
    print(f"# {torch.cuda.get_device_name()}, {args.rows} rows; GB/s of weight read, best config per family")
    for name in args.shapes.split(","):
        print(time_shape(name, args.rows), flush=True)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
