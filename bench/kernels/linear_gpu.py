"""Skinny GEMM (kernels/triton_linear.py, its shipped configs) vs cuBLAS at the Llama-3-8B decode shapes.

Run on a CUDA machine from the repo root: `python -m bench.kernels.linear_gpu [--rows 1,16] [--out FILE]`.
Each timing is a CUDA graph of back-to-back products over several distinct weight copies (as a decode step
reads every weight once, nothing stays in L2), GPU ms per product = median replay / copies. Prints, per
shape and row count: cuBLAS and the skinny GEMM with the config `pick_config` gives it, both as GB/s of
weight read and as % of the device-to-device copy bandwidth measured in the same run; --out writes them
as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from bench._cuda import copy_bandwidth, cuda_missing, graph_ms

BF16 = torch.bfloat16
# name → (N, K): the projections of one Llama-3-8B layer (fused qkv and gate_up) and the LM head.
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}


def time_shape(name: str, rows_list: list[int], bandwidth_gbps: float) -> dict:
    """cuBLAS and the shipped skinny GEMM for one weight shape at each row count; prints one line each."""
    from kernels.linear.config import pick_config
    from kernels.linear.kernel import skinny_linear, supports

    n, k = SHAPES[name]
    weight_bytes = n * k * 2
    copies = max(2, -(-(512 << 20) // weight_bytes))  # >= 512 MB per graph: L2 (50 MB) holds none of it
    weights = [torch.empty(n, k, dtype=BF16, device="cuda").normal_(std=0.02) for _ in range(copies)]

    def gbps(ms: float) -> float:
        return weight_bytes / (ms * 1e-3) / 1e9

    entries = {}
    for rows in rows_list:
        x = torch.randn(rows, k, dtype=BF16, device="cuda")
        config = pick_config(rows, n, k)
        entry = entries[f"{name}_m{rows}"] = {"n": n, "k": k, "rows": rows, "config": vars(config)}
        entry["cublas_ms"] = cublas = graph_ms(lambda i, x=x: F.linear(x, weights[i]), copies)
        if not supports(x, weights[0], config):
            entry["skinny"] = "not served: cuBLAS runs this shape"
            print(f"{name:8s} m={rows:<3d} cuBLAS {cublas * 1e3:7.1f} us | skinny GEMM does not serve it")
            continue
        got = skinny_linear(x, weights[0], config).float()
        entry["matches_cublas"] = torch.allclose(got, F.linear(x, weights[0]).float(), atol=2e-2, rtol=2e-2)
        entry["skinny_ms"] = ours = graph_ms(lambda i, x=x, c=config: skinny_linear(x, weights[i], c), copies)
        print(f"{name:8s} m={rows:<3d} cuBLAS {cublas * 1e3:7.1f} us {gbps(cublas):6.0f} GB/s "
              f"({gbps(cublas) / bandwidth_gbps:4.0%}) | skinny {ours * 1e3:7.1f} us {gbps(ours):6.0f} GB/s "
              f"({gbps(ours) / bandwidth_gbps:4.0%}) {config}"
              f"{'' if entry['matches_cublas'] else ' WRONG'}", flush=True)
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,16")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    if cuda_missing(__file__):
        return 2
    bandwidth = copy_bandwidth() / 1e9
    print(f"# {torch.cuda.get_device_name()}: copy {bandwidth:.0f} GB/s", flush=True)
    results: dict = {"copy_gbps": bandwidth, "shapes": {}}
    rows_list = [int(r) for r in args.rows.split(",")]
    for name in args.shapes.split(","):
        results["shapes"].update(time_shape(name, rows_list, bandwidth))
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0 if all(e.get("matches_cublas", True) for e in results["shapes"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
