"""Decode-sized linears (M = 1, 16) at one weight shape: cuBLAS bf16, torch int4, ours W4A16, ours w8."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from bench.kernels.quant_common import Run, rel_err, row, skipped
from engine.quantize.int4 import quantize_int4
from engine.quantize.w8a8 import quantize_per_channel
from kernels.quant_linear.config import W4_CANDIDATES, W8_CANDIDATES, auto_split_k, bucket, fit_k
from kernels.quant_linear.layout import W4Weight, W8Weight, pack_w4
from kernels.quant_linear.reference import dequantize_w4
from kernels.quant_linear.w4a16 import w4a16_linear
from kernels.quant_linear.w8 import w8_linear

TORCH_INT4_INNER_K_TILES = 8  # gpt-fast's choice; K must be a multiple of 8 · 16


def torch_int4(q: torch.Tensor, weight: W4Weight, copies: int):
    """torch's own CUDA int4 kernel over the same codes, packed `copies` times: ((x, i) → y with copy i) or
    the reason it is unavailable.

    Its packing op takes uint8 pairs [N, K / 2] (high nibble first) since torch 2.5 and int32 codes [N, K]
    before; it computes w = scale · (q − 8) + zero, so zero = low + 8 · scale (engine/quantize/int4.py).
    """
    aten = torch.ops.aten
    if not hasattr(aten, "_weight_int4pack_mm") or q.device.type != "cuda":
        return "torch has no CUDA _weight_int4pack_mm here"
    try:
        packed = aten._convert_weight_to_int4pack((q[:, 0::2] << 4 | q[:, 1::2]).to(torch.uint8),
                                                  TORCH_INT4_INNER_K_TILES)
    except RuntimeError:
        packed = aten._convert_weight_to_int4pack(q.to(torch.int32).contiguous(), TORCH_INT4_INNER_K_TILES)
    scale = weight.scale.float()
    zero = weight.low.float() + 8 * scale
    scale_zero = torch.stack((scale.t(), zero.t()), dim=-1).to(torch.bfloat16).contiguous()
    group = weight.group_size
    packs = [(packed, scale_zero)] + [(packed.clone(), scale_zero.clone()) for _ in range(copies - 1)]
    return lambda x, i: aten._weight_int4pack_mm(x, packs[i][0], group, packs[i][1])


def clones(weight, count: int) -> list:
    """count distinct copies (the first is weight): consecutive timed calls never find a weight in L2."""
    if isinstance(weight, torch.Tensor):
        return [weight] + [weight.clone() for _ in range(count - 1)]
    tensors = [f.name for f in dataclasses.fields(weight)
               if isinstance(getattr(weight, f.name), torch.Tensor)]
    return [weight] + [dataclasses.replace(weight, **{f: getattr(weight, f).clone() for f in tensors})
                       for _ in range(count - 1)]


def time_candidates(run: Run, shape: str, label: str, fn, weights: list, x: torch.Tensor, ref: torch.Tensor,
                    candidates, base_ms: float, roof_ms: float) -> dict:
    """Every candidate config of one of our kernels; the entry keeps all and names the fastest."""
    n, k = weights[0].shape
    results, best = {}, None
    for config in candidates:
        config = fit_k(auto_split_k(config, n, k), k)
        try:
            got = fn(x, weights[0], config)
        except ValueError:  # this config does not fit this shape or group size
            continue
        except Exception as error:  # one candidate that fails to build must not end the sweep
            skipped(config, error)
            continue
        err = rel_err(got, ref)
        ms = run.timer(lambda i, c=config: fn(x, weights[i], c), len(weights))
        entry = row("decode", shape, label, ms, base_ms, roof_ms, err, config)
        results[str(config)] = entry
        if err <= 2e-2 and (best is None or ms < best["ms"]):
            best = entry
    return {"candidates": results, "best": best}


def time_bf16(run: Run, name: str, weight: torch.Tensor, inputs: dict[int, torch.Tensor]) -> dict[int, dict]:
    """cuBLAS over bf16 copies of the weight: every other contestant's base."""
    n, k = weight.shape
    copies = clones(weight, run.copies(n * k * 2))
    out = {}
    for rows, x in inputs.items():
        ms = run.timer(lambda i, x=x: F.linear(x, copies[i]), len(copies))
        out[rows] = row("decode", f"{name} m={rows}", "bf16 cuBLAS", ms, ms, run.roof_ms(n * k * 2))
    return out


def time_w4(run: Run, name: str, weight: torch.Tensor, group: int, inputs: dict[int, torch.Tensor],
            base: dict[int, float]) -> dict[int, dict]:
    """torch's int4 kernel and ours at one group size, against the roofline of our layout's bytes."""
    q, d, m = quantize_int4(weight, group)
    w4 = pack_w4(q, d, m)
    reference = dequantize_w4(w4)
    weights = clones(w4, run.copies(w4.num_bytes))
    torch_fn = torch_int4(q, w4, len(weights))
    roof = run.roof_ms(w4.num_bytes)
    out: dict[int, dict] = {}
    for rows, x in inputs.items():
        shape, ref, entries = f"{name} m={rows}", x.float() @ reference.t(), out.setdefault(rows, {})
        row("decode", shape, f"roofline w4/g{group}", roof, base[rows])
        if callable(torch_fn):
            err = rel_err(torch_fn(x, 0), ref)
            ms = run.timer(lambda i, x=x, f=torch_fn: f(x, i), len(weights))
            entries[f"torch_int4_g{group}"] = row("decode", shape, f"torch int4/g{group}", ms, base[rows],
                                                  roof, err)
        else:
            entries[f"torch_int4_g{group}"] = {"unavailable": torch_fn}
        entries[f"ours_w4a16_g{group}"] = time_candidates(
            run, shape, f"ours W4A16/g{group}", w4a16_linear, weights, x, ref, W4_CANDIDATES[bucket(rows)],
            base[rows], roof)
    return out


def time_w8(run: Run, name: str, weight: torch.Tensor, inputs: dict[int, torch.Tensor],
            base: dict[int, float]) -> dict[int, dict]:
    """Our weight-only int8 GEMV (engine/quantize/w8a8's per-channel weights) against its roofline."""
    q, scale = quantize_per_channel(weight)
    w8 = W8Weight(q, scale)
    reference = q.float() * scale.unsqueeze(1)
    weights = clones(w8, run.copies(w8.num_bytes))
    roof = run.roof_ms(w8.num_bytes)
    out: dict[int, dict] = {}
    for rows, x in inputs.items():
        shape = f"{name} m={rows}"
        row("decode", shape, "roofline w8", roof, base[rows])
        out[rows] = {"ours_w8": time_candidates(run, shape, "ours w8", w8_linear, weights, x,
                                                x.float() @ reference.t(), W8_CANDIDATES[bucket(rows)],
                                                base[rows], roof)}
    return out


def decode_shape(run: Run, name: str, n: int, k: int, rows_list: list[int], groups: list[int]) -> dict:
    """One weight shape: every contestant at every row count (the table's decode lines)."""
    weight = torch.empty(n, k, dtype=run.dtype, device=run.device).normal_(std=0.02)
    inputs = {rows: torch.randn(rows, k, dtype=run.dtype, device=run.device) for rows in rows_list}
    bf16 = time_bf16(run, name, weight, inputs)
    base = {rows: entry["ms"] for rows, entry in bf16.items()}
    out = {rows: {"bf16": entry} for rows, entry in bf16.items()}
    parts = [time_w4(run, name, weight, group, inputs, base) for group in groups]
    parts.append(time_w8(run, name, weight, inputs, base))
    for part in parts:
        for rows, entries in part.items():
            out[rows].update(entries)
    return {f"m{rows}": entries for rows, entries in out.items()}
