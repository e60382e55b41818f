"""CPU quantized linears at one projection shape vs the fp32 GEMM (time per call): torch's ops and ours.

    .venv/bin/python -m bench.kernels.quantized_linear_cpu      # --n 1536 --k 576 --rows 1 512 --threads 1

What decided engine/quantize's CPU paths: which int4 / int8 op torch ships, in which activation dtype, is
vectorized on this CPU (torch.backends.cpu.get_cpu_capability()), against kernels/cpu_quant (GGUF Q4_1 and
Q8_0 blocks × fp32 activations), which w4a16 serves. `--stream`: every call reads another copy of the
weights (as many as fill 256 MB), so they come from DRAM as in a decode step, not from cache.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kernels.cpu_quant.layout import pack_q4_1, q8_0_of
from kernels.cpu_quant.ops import q4_1_linear, q8_0_linear


def best_seconds(fn: Callable[[], object], budget_s: float = 1.0) -> float:
    """Best-of-5 mean time per call, each repeat sized to ~budget_s / 5 after a warm-up call."""
    fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-6)
    calls = max(1, int(budget_s / 5 / once))
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def cycling(copies: list, fn: Callable[[object], object]) -> Callable[[], object]:
    """A call that runs fn on the next of `copies` each time."""
    state = {"i": 0}

    def call() -> object:
        state["i"] = (state["i"] + 1) % len(copies)
        return fn(copies[state["i"]])
    return call


def candidates(n: int, k: int, rows: int, stream: bool = False) -> dict[str, Callable[[], object]]:
    group = 32
    x = torch.randn(rows, k)
    copies = max(1, (256 << 20) // (n * k * 4)) if stream else 1  # the fp32 size: the largest
    w = torch.randn(n, k)
    q4 = torch.randint(0, 16, (n, k), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4, 1)
    scale_zero = torch.rand(k // group, n, 2)
    w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    w8_scale = torch.rand(n)
    x8 = torch.randint(-127, 128, (rows, k), dtype=torch.int8)
    xb, szb, w8_scale_b = x.bfloat16(), scale_zero.bfloat16(), w8_scale.bfloat16()
    int4 = torch.ops.aten._weight_int4pack_mm_for_cpu
    # FBGEMM's fp16-weight GEMM over the int8 values (exact in fp16): W8A8's CPU path (quantize/w8a8.py).
    fp16_pack = torch.ops.quantized.linear_prepack_fp16(w8.float(), None)
    q4 = [pack_q4_1(torch.randint(0, 16, (n, k), dtype=torch.uint8), torch.rand(n, k // group) * 0.01,
                    -torch.rand(n, k // group) * 0.1) for _ in range(copies * 8)]  # 8x fewer bytes each
    q8 = [q8_0_of(torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n, k // group) * 0.01)
          for _ in range(copies * 4)]
    fp32 = [w] + [torch.randn(n, k) for _ in range(copies - 1)]
    return {
        "fp32 F.linear": cycling(fp32, lambda weight: F.linear(x, weight)),
        "cpu_quant Q4_1, fp32 activations": cycling(q4, lambda weight: q4_1_linear(x, weight)),
        "cpu_quant Q8_0, fp32 activations": cycling(q8, lambda weight: q8_0_linear(x, weight)),
        "int4pack_mm, bf16 activations": lambda: int4(xb, packed, group, szb),
        "int4pack_mm, fp32 activations": lambda: int4(x, packed, group, scale_zero),
        "int8pack_mm (w8a16), bf16 activations": lambda: torch._weight_int8pack_mm(xb, w8, w8_scale_b),
        "int8pack_mm (w8a16), fp32 activations": lambda: torch._weight_int8pack_mm(x, w8, w8_scale),
        "_int_mm int8 x int8": lambda: torch._int_mm(x8, w8.t()),
        "fp32 GEMM over int8 values": lambda: F.linear(x8.float(), w8.float()),
        "FBGEMM fp16-weight GEMM over int8 values": lambda: torch.ops.quantized.linear_dynamic_fp16(
            x8.float(), fp16_pack),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1536, help="out features (default: SmolLM2's gate/up)")
    parser.add_argument("--k", type=int, default=576, help="in features")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 512])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stream", action="store_true",
                        help="weights from DRAM (a fresh copy each call; torch's own ops keep one copy)")
    parser.add_argument("--ours-only", action="store_true", help="fp32 and kernels/cpu_quant rows only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.threads} thread(s), weight [{args.n}, {args.k}], "
          f"{'streamed from DRAM' if args.stream else 'one copy (cache-resident where it fits)'}")
    for rows in args.rows:
        fns = candidates(args.n, args.k, rows, args.stream)
        if args.ours_only:
            fns = {name: fn for name, fn in fns.items()
                   if name == "fp32 F.linear" or name.startswith("cpu_quant")}
        timings = {name: best_seconds(fn) for name, fn in fns.items()}
        base = timings["fp32 F.linear"]
        for name, seconds in timings.items():
            print(f"M={rows:<4d} {name:40s} {seconds * 1e3:9.3f} ms  {seconds / base:6.2f}x fp32")


if __name__ == "__main__":
    main()
