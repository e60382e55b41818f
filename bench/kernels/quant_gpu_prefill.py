"""Prefill-sized W8A8 (M = 2048) at one weight shape: cuBLAS bf16 vs torch._int_mm vs ours, act quant in."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.kernels.quant_common import Run, rel_err, row, skipped
from engine.quantize.w8a8 import quantize_per_channel
from kernels.quant_linear.config import W8A8_CANDIDATES
from kernels.quant_linear.layout import W8Weight
from kernels.quant_linear.reference import int8_gemm_ref, quantize_rows_ref
from kernels.quant_linear.w8a8 import int8_gemm, quantize_rows

COPIES = 3  # compute-bound: the same weight again costs nothing extra, a few calls per graph amortize launch


def torch_w8a8(x: torch.Tensor, weight: W8Weight) -> torch.Tensor:
    """The W8A8 torch ships: per-token quantization in eager ops, torch._int_mm, both scales after."""
    q_x, x_scale = quantize_rows_ref(x)
    return (torch._int_mm(q_x, weight.q.t()).float() * x_scale.unsqueeze(1) * weight.scale).to(x.dtype)


def prefill_shape(run: Run, name: str, n: int, k: int, rows: int) -> dict:
    """bf16, torch._int_mm alone and with its act quant, ours act quant alone and every ours GEMM candidate
    with its act quant (the W8A8 number: what a layer pays)."""
    dev = run.device
    weight = torch.empty(n, k, dtype=run.dtype, device=dev).normal_(std=0.02)
    x = torch.randn(rows, k, dtype=run.dtype, device=dev)
    w8 = W8Weight(*quantize_per_channel(weight))
    q_ref, scale_ref = quantize_rows_ref(x)
    ref = int8_gemm_ref(q_ref, scale_ref, w8, torch.float32)
    shape = f"{name} m={rows}"
    out: dict = {}
    base = run.timer(lambda i: F.linear(x, weight), COPIES)
    out["bf16"] = row("prefill", shape, "bf16 cuBLAS", base, base)
    w_t = w8.q.t()
    if dev.type == "cuda":  # torch._int_mm on CPU is a scalar loop (docs/benchmarks.md)
        out["torch_int_mm"] = row("prefill", shape, "torch _int_mm only", run.timer(
            lambda i: torch._int_mm(q_ref, w_t), COPIES), base)
        out["torch_w8a8"] = row("prefill", shape, "torch quant+_int_mm", run.timer(
            lambda i: torch_w8a8(x, w8), COPIES), base, err=rel_err(torch_w8a8(x, w8), ref))
    out["ours_act_quant"] = row("prefill", shape, "ours act quant only",
                                run.timer(lambda i: quantize_rows(x), COPIES))
    results, best = {}, None
    for config in W8A8_CANDIDATES:
        def w8a8(c=config) -> torch.Tensor:
            return int8_gemm(*quantize_rows(x), w8, run.dtype, c)

        try:
            err = rel_err(w8a8(), ref)
        except Exception as error:  # one candidate that fails to build must not end the sweep
            skipped(config, error)
            continue
        ms = run.timer(lambda i, f=w8a8: f(), COPIES)
        entry = row("prefill", shape, "ours W8A8 (quant+gemm)", ms, base, err=err, config=config)
        results[str(config)] = entry
        if entry["rel_err"] <= 2e-2 and (best is None or entry["ms"] < best["ms"]):
            best = entry
    out["ours_w8a8"] = {"candidates": results, "best": best}
    return out
