"""A kernel chain run one kernel at a time against the same chain replayed from a CUDA graph under PDL."""
from __future__ import annotations

from collections.abc import Callable

import torch

from kernels.pdl import pdl_launch


def stepped_and_replayed(chain: Callable[[bool], object], device: torch.device) -> tuple[object, object]:
    """(chain(sync=True), chain captured with sync=False and replayed three times). Synchronizing after each
    kernel keeps any from overlapping its predecessor; replayed back to back under programmatic dependent
    launch (kernels/pdl.py, on Hopper) they do. Checks that the launches asked for PDL where it exists."""
    expected = chain(True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = chain(False)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert pdl_launch(device)["USE_PDL"] == (torch.cuda.get_device_capability(device)[0] >= 9)
    return expected, got
