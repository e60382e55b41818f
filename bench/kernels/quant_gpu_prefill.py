"""Prefill-sized W8A8 (M = 2048) at one weight shape: cuBLAS bf16 vs torch._int_mm vs our int8 GEMM, alone
and with its activation quantization; at the down projection also the pair a layer runs from gate_up. Our
activation quantization rotates as the engine's W8A8 does (engine/quantize/w8a8.py: Hadamard blocks of
rotation_block(K), the weight rotated to match); torch's rows quantize the input as it is."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.kernels.quant_common import MAX_REL_ERR, Run, rel_err, row, skipped
from engine.quantize.w8a8 import quantize_per_channel, rotated_weight, rotation_block
from kernels.activation.kernel import silu_mul_triton
from kernels.linear.kernel import silu_mul_linear_triton
from kernels.quant_linear.act_quant import quantize_rows, silu_mul_quantize_rows
from kernels.quant_linear.config import W8A8_CANDIDATES, QuantConfig
from kernels.quant_linear.layout import W8Weight
from kernels.quant_linear.reference import (
    hadamard_blocks_ref,
    int8_gemm_ref,
    quantize_rows_ref,
    silu_mul_quantize_rows_ref,
)
from kernels.quant_linear.w8a8 import default_config, int8_gemm

COPIES = 3  # compute-bound: the same weight again costs nothing extra, a few calls per graph amortize launch
SILU_MUL_INPUT = "down"  # the shape whose input is the MLP's gate_up
FUSED_WARPS = (8, 16, 32)  # silu_mul_quantize_rows launches at 16 for I = 14336


def label(config: QuantConfig) -> str:
    """A candidate's tile, warps and stages, and its kernel: short enough for a table column."""
    kind = "tma" if config.tma else "pointers"
    group = f" group {config.group_m}" if config.group_m != 8 else ""
    return (f"{config.block_m}x{config.block_n}x{config.block_k} w{config.num_warps} s{config.num_stages} "
            f"{kind}{group}")


def torch_w8a8(x: torch.Tensor, weight: W8Weight) -> torch.Tensor:
    """The W8A8 torch ships: per-token quantization in eager ops, torch._int_mm, both scales after."""
    q_x, x_scale = quantize_rows_ref(x)
    return (torch._int_mm(q_x, weight.q.t()).float() * x_scale.unsqueeze(1) * weight.scale).to(x.dtype)


def gemm_sweep(run: Run, shape: str, q_x: torch.Tensor, x_scale: torch.Tensor, w8: W8Weight,
               ref: torch.Tensor, base: float) -> dict:
    """Every candidate's int8 GEMM alone (input quantized beforehand): the fastest correct one and the one a
    caller gets by default (w8a8.default_config)."""
    results: dict = {}
    best, best_config = None, None
    for config in W8A8_CANDIDATES:
        def gemm(c: QuantConfig = config) -> torch.Tensor:
            return int8_gemm(q_x, x_scale, w8, run.dtype, c)

        try:
            err = rel_err(gemm(), ref)
        except Exception as error:  # one candidate that fails to build must not end the sweep
            skipped(config, error)
            continue
        entry = row("prefill", shape, "ours int8 GEMM only", run.timer(lambda i, f=gemm: f(), COPIES), base,
                    err=err, config=label(config))
        results[label(config)] = entry
        if entry["rel_err"] <= MAX_REL_ERR and (best is None or entry["ms"] < best["ms"]):
            best, best_config = entry, config
    default = results.get(label(default_config(q_x, w8)))
    return {"candidates": results, "best": best, "best_config": best_config, "default": default}


def down_pair(run: Run, shape: str, weight: torch.Tensor, w8: W8Weight, rows: int,
              configs: dict[str, QuantConfig]) -> dict:
    """From gate_up [M, 2K]: the bf16 layer's silu_mul + GEMM (the registry's silu_mul_linear) vs ours,
    fused (silu-mul-quant, GEMM) and unfused (silu_mul, quantize_rows, GEMM), per GEMM config."""
    k = weight.shape[1]
    rot = rotation_block(k)
    gate_up = torch.randn(rows, 2 * k, dtype=run.dtype, device=run.device)
    ref = int8_gemm_ref(*silu_mul_quantize_rows_ref(gate_up, None, rot), w8, torch.float32)
    base = run.timer(lambda i: silu_mul_linear_triton(gate_up, weight), COPIES)
    out = {"bf16": row("prefill", shape, "bf16 silu_mul+GEMM", base, base)}  # no err: ref is quantized
    # the activation side alone: two kernels and a 16-bit round trip, or one (whole row in registers:
    # the warps a row trade registers a thread against rows in flight)
    act = silu_mul_triton(gate_up)
    rotated_act = hadamard_blocks_ref(act.float(), rot)

    def act_err(q: torch.Tensor, scale: torch.Tensor) -> float:  # the codes dequantized vs the activation
        return rel_err(q.float() * scale.unsqueeze(1), rotated_act)

    out["unfused_act_quant"] = row("prefill", shape, "ours silu_mul+quant", run.timer(
        lambda i: quantize_rows(silu_mul_triton(gate_up), None, rot), COPIES),
        err=act_err(*quantize_rows(act, None, rot)))
    for warps in FUSED_WARPS:
        ms = run.timer(lambda i, w=warps: silu_mul_quantize_rows(gate_up, num_warps=w, rotation_block=rot),
                       COPIES)
        out[f"fused_act_quant_w{warps}"] = row(
            "prefill", shape, "ours silu-mul-quant", ms,
            err=act_err(*silu_mul_quantize_rows(gate_up, num_warps=warps, rotation_block=rot)),
            config=f"{warps} warps")
    for which, config in configs.items():
        def fused(c: QuantConfig = config) -> torch.Tensor:
            return int8_gemm(*silu_mul_quantize_rows(gate_up, rotation_block=rot), w8, run.dtype, c)

        def unfused(c: QuantConfig = config) -> torch.Tensor:
            return int8_gemm(*quantize_rows(silu_mul_triton(gate_up), None, rot), w8, run.dtype, c)

        for name, fn in (("fused", fused), ("unfused", unfused)):
            ms = run.timer(lambda i, f=fn: f(), COPIES)
            out[f"{name}_{which}"] = row("prefill", shape, f"ours {name} silu-quant", ms, base,
                                         err=rel_err(fn(), ref), config=f"{which}: {label(config)}")
    return out


def prefill_shape(run: Run, name: str, n: int, k: int, rows: int) -> dict:
    """bf16; torch._int_mm alone and with its act quant; our act quant alone; every candidate of our GEMM
    alone; the best and the default GEMM with our act quant (what a layer pays); at the down projection the
    pair from gate_up."""
    dev = run.device
    weight = torch.empty(n, k, dtype=run.dtype, device=dev).normal_(std=0.02)
    x = torch.randn(rows, k, dtype=run.dtype, device=dev)
    rotated, rot = rotated_weight(weight, torch.ones(k, device=dev))
    w8, w8_torch = W8Weight(*quantize_per_channel(rotated)), W8Weight(*quantize_per_channel(weight))
    q_ref, scale_ref = quantize_rows_ref(x, None, rot)
    ref = int8_gemm_ref(q_ref, scale_ref, w8, torch.float32)
    shape = f"{name} m={rows}"
    out: dict = {}
    base = run.timer(lambda i: F.linear(x, weight), COPIES)
    out["bf16"] = row("prefill", shape, "bf16 cuBLAS", base, base)
    if dev.type == "cuda":  # torch._int_mm on CPU is a scalar loop (docs/benchmarks.md)
        w_t = w8_torch.q.t()
        out["torch_int_mm"] = row("prefill", shape, "torch _int_mm only", run.timer(
            lambda i: torch._int_mm(q_ref, w_t), COPIES), base)
        torch_ref = int8_gemm_ref(*quantize_rows_ref(x), w8_torch, torch.float32)  # its own, unrotated
        out["torch_w8a8"] = row("prefill", shape, "torch quant+_int_mm", run.timer(
            lambda i: torch_w8a8(x, w8_torch), COPIES), base, err=rel_err(torch_w8a8(x, w8_torch), torch_ref))
    out["ours_act_quant"] = row("prefill", shape, "ours act quant only",
                                run.timer(lambda i: quantize_rows(x, None, rot), COPIES))
    sweep = gemm_sweep(run, shape, *quantize_rows(x, None, rot), w8, ref, base)
    best_config = sweep.pop("best_config")
    out["ours_gemm"] = sweep
    if best_config is None:
        return out
    configs = {"best": best_config, "default": default_config(q_ref, w8)}
    if configs["default"] == best_config:
        del configs["default"]
    out["ours_w8a8"] = {}
    for which, config in configs.items():
        def w8a8(c: QuantConfig = config) -> torch.Tensor:
            return int8_gemm(*quantize_rows(x, None, rot), w8, run.dtype, c)

        ms = run.timer(lambda i, f=w8a8: f(), COPIES)
        out["ours_w8a8"][which] = row("prefill", shape, "ours quant+GEMM", ms, base, err=rel_err(w8a8(), ref),
                                      config=f"{which}: {label(config)}")
    if name == SILU_MUL_INPUT:
        out["down_pair"] = down_pair(run, shape, weight, w8, rows, configs)
    return out


def prefill_summary(results: dict) -> list[str]:
    """Per shape: our GEMM alone (best, default), torch._int_mm alone, ours with its act quant, torch's;
    at the down projection the fused pair against the bf16 one. All × bf16 (bf16 time / this time)."""
    lines = []
    for name, entries in results.items():
        gemm, base = entries["ours_gemm"], entries["bf16"]["ms"]
        if not gemm["best"]:
            continue
        quant = entries["ours_w8a8"]

        def x(entry: dict | None, base: float = base) -> str:
            return f"{base / entry['ms']:.2f}x" if entry else "n/a"

        parts = [f"int8 GEMM alone best {x(gemm['best'])} ({gemm['best']['config']}), default "
                 f"{x(gemm['default'])}", f"quant+GEMM best {x(quant['best'])}, default "
                 f"{x(quant.get('default', quant['best']))}"]
        if "torch_int_mm" in entries:
            parts += [f"torch _int_mm alone {x(entries['torch_int_mm'])}",
                      f"torch quant+_int_mm {x(entries['torch_w8a8'])}"]
        lines.append(f"prefill {name} W8A8 vs bf16: " + "; ".join(parts))
        pair = entries.get("down_pair")
        if pair:
            pair_base = pair["bf16"]["ms"]
            ratios = "; ".join(f"{key.replace('_', ' ')} {pair_base / entry['ms']:.2f}x"
                               for key, entry in pair.items() if key != "bf16" and "act_quant" not in key)
            lines.append(f"prefill {name} from gate_up vs bf16 silu_mul+GEMM: {ratios}")
            act = ", ".join(f"{key.replace('_act_quant', '')} {entry['ms'] * 1e3:.1f} us"
                            for key, entry in pair.items() if "act_quant" in key)
            lines.append(f"prefill {name} act quant from gate_up alone: {act}")
    return lines
