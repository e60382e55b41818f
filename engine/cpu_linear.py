"""fp32 CPU linears for decode: weights packed for kernels/cpu_quant's f32_linear in one huge-page arena."""
from __future__ import annotations

import ctypes
import logging
import sys

import torch
from torch import nn

from engine.model import LlamaModel
from kernels.activation.reference import silu_mul_ref
from kernels.cpu_quant.f32_ops import f32_linear, pack_pairs, supports, unpack_pairs
from kernels.cpu_quant.library import CompilerMissingError, library
from kernels.linear.modules import SiluMulLinear

logger = logging.getLogger(__name__)

_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # Linux <sys/mman.h>


def _huge_page_arena(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A fresh flat CPU tensor whose memory the kernel is asked to back with 2 MB transparent huge pages.

    Decode streams every weight once per token; on 4 KB pages that costs a TLB miss every 4 KB (bs1 decode
    measured ~3% faster on huge pages). The advice must precede the first touch, so callers copy in after.
    Off Linux, or with THP off, this is a plain buffer: same layout, same numerics.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    buf = torch.empty(numel + _HUGE_PAGE // itemsize, dtype=dtype)
    skip = -buf.data_ptr() % _HUGE_PAGE  # bytes up to the first 2 MB boundary (data_ptr is 64-byte aligned)
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.madvise(ctypes.c_void_p(buf.data_ptr() + skip), ctypes.c_size_t(numel * itemsize),
                        _MADV_HUGEPAGE) != 0:
            logger.info("madvise(MADV_HUGEPAGE) failed (errno %d): CPU weights stay on 4 KB pages",
                        ctypes.get_errno())
    return buf[skip // itemsize:skip // itemsize + numel]


class F32Linear(nn.Module):
    """Bias-free fp32 linear whose weight is packed for f32_linear (kernels/cpu_quant/f32_ops.py): rows in
    pairs, each pair one sequential stream; the kernel reads the weight once for all rows of a product.

    It replaced a column-blocked torch.bmm GEMV (one row) and oneDNN's packed GEMM (more rows): bs1 decode
    ~30% faster at one thread, a 6-row verify 1.5× a plain step instead of 2× (docs/benchmarks.md, "A verify
    that streams the weights once"), and no second packed copy of the weights for multi-row steps. Output
    rows are the same bits at any row count and thread count. Same math as nn.Linear up to the order of the
    fp32 additions. `storage`: a flat tensor of weight.numel() floats to hold the packed weight.
    `silu_mul_input`: it replaces a SiluMulLinear (its input is gate_up: silu_mul is applied first).
    """

    def __init__(self, weight: torch.Tensor, storage: torch.Tensor | None = None,
                 silu_mul_input: bool = False) -> None:
        super().__init__()
        if not supports(weight):
            raise ValueError(f"f32_linear takes fp32 CPU weights with an even row count and K % 8 == 0, "
                             f"got {tuple(weight.shape)} {weight.dtype} on {weight.device}")
        self.silu_mul_input = silu_mul_input
        self.out_features, self.in_features = weight.shape
        self.packed = nn.Parameter(pack_pairs(weight, storage), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The dense [out, in] weight (unpacked: a copy)."""
        return unpack_pairs(self.packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return f32_linear(silu_mul_ref(x) if self.silu_mul_input else x, self.packed)


def cpu_linears_available() -> bool:
    """Whether kernels/cpu_quant builds here (it needs a C compiler); logs why not."""
    try:
        library()
    except CompilerMissingError as e:
        logger.warning("fp32 CPU linears stay torch's: %s", e)
        return False
    return True


def use_cpu_linears(model: LlamaModel) -> int:
    """Swap every fp32 projection and the LM head (a copy, if tied) to F32Linear; returns the count.

    The packed weights all live in one huge-page arena (_huge_page_arena). Without a C compiler the model
    keeps its torch linears (the plain forward serves it, slower) and this returns 0.
    """
    swaps: list[tuple[nn.Module, str, torch.Tensor, bool]] = []
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None and supports(child.weight):
                swaps.append((module, name, child.weight, isinstance(child, SiluMulLinear)))
    if model.lm_head is None and supports(model.embed_tokens.weight):
        # The tied head gets its own packed copy: the embedding lookup still needs the row layout.
        swaps.append((model, "lm_head", model.embed_tokens.weight, False))
    if not swaps or not cpu_linears_available():
        return 0
    arena = _huge_page_arena(sum(w.numel() for _, _, w, _ in swaps), torch.float32)
    offset = 0
    for module, name, weight, silu_mul_input in swaps:
        storage = arena[offset:offset + weight.numel()]
        setattr(module, name, F32Linear(weight, storage, silu_mul_input))
        offset += weight.numel()
    return len(swaps)
