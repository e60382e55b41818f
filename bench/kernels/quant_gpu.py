"""Quantized GPU kernels vs torch's and the memory roofline at Llama-3-8B shapes, with a correctness check.

Run from the repo root on a CUDA machine: `python -m bench.kernels.quant_gpu [--out FILE]` (under 5 minutes on
an H100). Sections (one table; "vs base" = bf16 time / this time, "of roof" = roofline / this time):
  - decode, M = 1 and 16: cuBLAS bf16, torch's int4 kernel (`_weight_int4pack_mm`, its own packing of the same
    codes), ours W4A16 (kernels/quant_linear/w4a16.py) per group size, ours weight-only int8 (w8.py). Each of
    ours runs every candidate config (kernels/quant_linear/config.py); the JSON names the fastest. Roofline:
    the weight bytes as stored / the device-to-device copy bandwidth measured in this run. Each timing is a
    CUDA graph over distinct weight copies (>= 512 MB, so L2 holds none of it).
  - prefill, M = 2048: cuBLAS bf16 vs torch._int_mm (alone, and with torch's per-token act quant) vs our int8
    GEMM alone (input quantized beforehand; every candidate, the JSON names the fastest and the default) and
    with our act quant (the best and the default GEMM); at down also the pair a layer runs from gate_up: bf16
    silu_mul + GEMM vs our fused silu-mul-quant + GEMM (and the unfused silu_mul, quantize_rows, GEMM).
  - attention: the shipped decode attention at context 8k over bf16 / int8 / int4 KV caches.
"rel err" = max |ours − reference| / max |reference| against the torch reference of the same quantized
weights (or cache); over 2e-2 prints WRONG and the exit status is 1. `--smoke` runs tiny shapes on the CPU
under the Triton interpreter (timings meaningless): a check that the script runs, without a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

# name → (N, K): the projections of one Llama-3-8B layer (fused qkv and gate_up)
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
SMOKE_SHAPES = {"tiny": (64, 256), "down": (32, 512)}  # "down": the prefill section's gate_up pair runs


def ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t]


def wrong(entries: object) -> bool:
    """Whether any rel_err under entries is over the bound (torch's and ours alike)."""
    from bench.kernels.quant_common import MAX_REL_ERR

    if isinstance(entries, dict):
        if entries.get("rel_err", 0.0) > MAX_REL_ERR:
            return True
        return any(wrong(v) for v in entries.values())
    return False


def summary(results: dict) -> list[str]:
    """The headline ratios (issue 12's goals): best of ours per shape vs bf16, torch's kernel and the roof."""
    from bench.kernels.quant_gpu_prefill import prefill_summary

    lines = []
    for name, by_rows in results["decode"].items():
        for rows, entries in by_rows.items():
            base = entries["bf16"]["ms"]
            for key, entry in entries.items():
                best = entry.get("best") if isinstance(entry, dict) else None
                if not key.startswith("ours") or not best:
                    continue
                torch_ms = entries.get(key.replace("ours_w4a16", "torch_int4"), {}).get("ms")
                vs_torch = f", {torch_ms / best['ms']:.2f}x torch int4" if torch_ms and "w4a16" in key else ""
                roof = f"roof {base / best['roof_ms']:.2f}x, {best['fraction_of_roof']:.0%} of roof"
                lines.append(f"decode  {name} {rows} {key}: {base / best['ms']:.2f}x bf16 ({roof}){vs_torch}")
    lines += prefill_summary(results["prefill"])
    for case, entries in results["attention"].items():
        ratios = ", ".join(f"{dtype} {entry['speedup_vs_bf16']:.2f}x" for dtype, entry in entries.items()
                           if isinstance(entry, dict) and "speedup_vs_bf16" in entry)
        lines.append(f"attention {case} vs the float cache: {ratios}")
        for sweep in ("int8_sweep", "int4_sweep"):
            best = entries.get(sweep, {}).get("best")
            if best:
                lines.append(f"attention {case} {sweep[:4]} best {best['config']}: "
                             f"{best['speedup_vs_bf16']:.2f}x bf16")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,16", help="decode row counts")
    parser.add_argument("--groups", default="32,128", help="int4 group sizes (GGUF Q4_1: 32)")
    parser.add_argument("--prefill-rows", type=int, default=2048)
    parser.add_argument("--context", type=int, default=8192, help="decode attention context")
    parser.add_argument("--batches", default="1,16,64", help="decode attention batch sizes")
    parser.add_argument("--sections", default="decode,prefill,attention")
    parser.add_argument("--attention-sweeps", default="int8,int4",
                        help="the attention section's launch sweeps (int8, int4; '' for none)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, Triton interpreter")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    from bench._cuda import copy_bandwidth, cuda_missing, graph_ms
    from bench.kernels.quant_common import HEADER, Run, wall_ms

    if args.smoke:
        run, shapes = Run(torch.device("cpu"), wall_ms, copy_gbps=10.0, dtype=torch.float16), SMOKE_SHAPES
        prefill_rows, context, batches = 20, 64, [2]
    elif cuda_missing(__file__):
        return 2
    else:
        run = Run(torch.device("cuda"), lambda fn, copies: graph_ms(fn, copies), copy_bandwidth() / 1e9)
        shapes, prefill_rows, context, batches = SHAPES, args.prefill_rows, args.context, ints(args.batches)
    import triton

    from bench.kernels.quant_gpu_attention import attention_case
    from bench.kernels.quant_gpu_decode import decode_shape
    from bench.kernels.quant_gpu_prefill import prefill_shape

    device_name = torch.cuda.get_device_name() if run.device.type == "cuda" else "cpu (smoke)"
    print(f"# {device_name} | torch {torch.__version__} | triton {triton.__version__} | "
          f"copy {run.copy_gbps:.0f} GB/s", flush=True)
    print(HEADER)
    results: dict = {"device": device_name, "torch": torch.__version__, "triton": triton.__version__,
                     "copy_gbps": run.copy_gbps, "decode": {}, "prefill": {}, "attention": {}}
    sections = args.sections.split(",")

    def save() -> None:  # after every shape and case: a sweep cut short keeps what it timed
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))

    torch.manual_seed(0)
    for name, (n, k) in shapes.items():
        if "decode" in sections:
            results["decode"][name] = decode_shape(run, name, n, k, ints(args.rows), ints(args.groups))
        if "prefill" in sections:
            results["prefill"][name] = prefill_shape(run, name, n, k, prefill_rows)
        save()
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
    if "attention" in sections:
        for batch in batches:
            results["attention"][f"B{batch}_ctx{context}"] = attention_case(
                run, batch, context, tuple(filter(None, args.attention_sweeps.split(","))))
            save()
            if run.device.type == "cuda":
                torch.cuda.empty_cache()
    print("# summary (best config of ours per shape)")
    print("\n".join(summary(results)))
    save()
    return 1 if wrong(results) else 0


if __name__ == "__main__":
    sys.exit(main())
