"""What the sections of bench/kernels/quant_gpu.py share: the run's device and timer, error, table rows."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

STREAM_BYTES = 512 << 20  # each timing streams at least this much weight: L2 (50 MB) holds none of it
MAX_REL_ERR = 2e-2  # bf16 outputs over K ≤ 14336 land near 4e-3; a wrong kernel lands near 1


@dataclass(frozen=True)
class Run:
    """device; timer(fn, copies) → ms per fn(i) call for i over copies; copy bandwidth (the memory roof);
    dtype of activations, bf16 weights and the float KV cache (float16 in the smoke run: this Triton's
    interpreter gets tl.dot on bfloat16 wrong)."""

    device: torch.device
    timer: Callable[[Callable[[int], object], int], float]
    copy_gbps: float
    dtype: torch.dtype = torch.bfloat16

    def copies(self, num_bytes: int) -> int:
        if self.device.type != "cuda":
            return 1
        return max(2, -(-STREAM_BYTES // max(1, num_bytes)))

    def roof_ms(self, num_bytes: int) -> float:
        return num_bytes / (self.copy_gbps * 1e9) * 1e3


def wall_ms(fn: Callable[[int], object], copies: int) -> float:
    """The CPU smoke run's timer: wall ms of one pass (the numbers mean nothing; the code paths run)."""
    start = time.perf_counter()
    for i in range(copies):
        fn(i)
    return (time.perf_counter() - start) * 1e3 / copies


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got − ref| / max |ref|: a fast wrong kernel shows as ~1."""
    ref = ref.float()
    return float((got.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


HEADER = (f"{'section':9s} {'shape':14s} {'contestant':22s} {'us':>9s} {'vs base':>8s} {'of roof':>8s} "
          f"{'rel err':>9s}  config")


def row(section: str, shape: str, name: str, ms: float, base_ms: float | None = None,
        roof_ms: float | None = None, err: float | None = None, config: object = "") -> dict:
    """Prints one table line and returns it as a JSON entry; base: the bf16 contestant of the same shape."""
    entry = {"ms": ms, "config": str(config)}
    speedup = f"{base_ms / ms:7.2f}x" if base_ms else f"{'':8s}"
    of_roof = f"{roof_ms / ms:7.0%}" if roof_ms else f"{'':7s}"
    if base_ms:
        entry["speedup_vs_bf16"] = base_ms / ms
    if roof_ms:
        entry["roof_ms"] = roof_ms
        entry["fraction_of_roof"] = roof_ms / ms
    flag = ""
    if err is not None:
        entry["rel_err"] = err
        flag = " WRONG" if err > MAX_REL_ERR else ""
    err_text = f"{err:9.2e}" if err is not None else f"{'':9s}"
    print(f"{section:9s} {shape:14s} {name:22s} {ms * 1e3:9.1f} {speedup} {of_roof:>8s} {err_text}  "
          f"{config}{flag}", flush=True)
    return entry


def skipped(config: object, error: Exception) -> None:
    """Prints a candidate that failed to build or launch here (Triton version, shared memory) and why."""
    reason = (str(error).strip().splitlines() or [""])[0][:160]
    print(f"# skipped {config}: {type(error).__name__}: {reason}", flush=True)
