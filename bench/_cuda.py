"""What the GPU benchmarks share: the clean no-CUDA exit, CUDA-event and CUDA-graph timers, copy bandwidth."""
from __future__ import annotations

import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

_REPO = Path(__file__).resolve().parents[1]


def cuda_missing(script: str) -> bool:
    """True, after saying so on stderr, when there is no CUDA device; `script`: the caller's __file__."""
    if torch.cuda.is_available():
        return False
    print(f"{Path(script).resolve().relative_to(_REPO)} needs a CUDA device", file=sys.stderr)
    return True


def median_event_ms(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    """Median GPU ms of fn() over `repeats` calls, each bracketed by CUDA events."""
    for _ in range(warmup):
        fn()
    pairs = [tuple(torch.cuda.Event(enable_timing=True) for _ in "se") for _ in range(repeats)]
    for start, end in pairs:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in pairs)


def graph_ms(fn: Callable[[int], object], copies: int, repeats: int = 15) -> float:
    """GPU ms per fn(i) call, i over `copies` inputs, captured in one graph and replayed `repeats` times."""
    for i in range(copies):  # warm-up: compiles, lets cuBLAS pick, outside the capture
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            fn(i)
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times) / copies


def copy_bandwidth(num_bytes: int = 4 << 30) -> float:
    """Bytes/s (read + written) of a device-to-device bf16 copy of num_bytes / 2 each way: the memory roof."""
    src = torch.randn(num_bytes // 4, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    return num_bytes / (median_event_ms(lambda: dst.copy_(src), repeats=20) * 1e-3)
