"""CPU decode path: weights re-laid out for per-core GEMVs, and a flat small-batch decode step (same math)."""
from __future__ import annotations

import ctypes
import logging
import math
import sys
import weakref
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engine.kv_cache import KVCache
from engine.model import LlamaModel
from engine.quantize.cpu_linears import Q41Linear, Q80Linear
from engine.quantize.w8a8 import W8A8Linear
from kernels.activation.reference import silu_mul_ref
from kernels.cpu_quant.layout import Q41Weight, Q80Weight
from kernels.cpu_quant.step import DecodeStep, StepLayer
from kernels.linear.modules import SiluMulLinear
from kernels.store_kv.reference import store_kv_ref

logger = logging.getLogger(__name__)


# ---- CPU decode layout (a transform over the loaded model; numerics unchanged up to fp32 rounding) --------

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


class ColumnBlockLinear(nn.Module):
    """Bias-free linear stored as `parts` column blocks of its weight, transposed: [parts, in / parts, out].

    At bs1 decode every linear is a GEMV, which MKL runs on a single core at ~half the memory bandwidth. One
    bmm over the blocks runs one GEMV per core, each streaming its own contiguous block of whole K-major
    rows; the per-block partial sums are then added. Splitting the input features (rather than the outputs)
    keeps rows long and measured ~15% faster on the small projections. Same math as nn.Linear up to the
    order of the fp32 additions. `storage`: a flat tensor of weight.numel() elements to hold the blocks.
    `silu_mul_input`: it replaces a SiluMulLinear (its input is gate_up: silu_mul is applied first).
    """

    def __init__(self, weight: torch.Tensor, parts: int, storage: torch.Tensor | None = None,
                 silu_mul_input: bool = False) -> None:
        super().__init__()
        self.silu_mul_input = silu_mul_input
        out_features, in_features = weight.shape
        if in_features % parts:
            raise ValueError(f"in_features {in_features} is not divisible into {parts} blocks")
        self.in_features, self.out_features, self.parts = in_features, out_features, parts
        blocks = weight.detach().t().reshape(parts, in_features // parts, out_features)
        if storage is None:
            blocks = blocks.contiguous()
        else:
            with torch.no_grad():
                blocks = storage.view(blocks.shape).copy_(blocks)
        self.weight_blocks = nn.Parameter(blocks, requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The dense [out, in] weight (a transposed view of the blocks)."""
        return self.weight_blocks.reshape(self.in_features, self.out_features).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.silu_mul_input:
            x = silu_mul_ref(x)
        if x.shape[0] == 1 and x.dim() == 2 and x.is_contiguous():  # bs1 decode: blocks are a view
            rows = x.view(self.parts, 1, self.in_features // self.parts)
        else:
            rows = x.reshape(-1, self.parts, self.in_features // self.parts).transpose(0, 1)
        out = torch.bmm(rows, self.weight_blocks).sum(0)  # [parts, m, out] partial sums → [m, out]
        return out if x.dim() == 2 else out.view(*x.shape[:-1], self.out_features)


def use_column_blocks(model: LlamaModel, parts: int) -> int:
    """Swap every projection and the LM head (a copy, if tied) to ColumnBlockLinear; returns the count.

    CPU blocks all live in one huge-page arena (_huge_page_arena).
    """
    swaps: list[tuple[nn.Module, str, torch.Tensor, bool]] = []
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None and child.in_features % parts == 0:
                swaps.append((module, name, child.weight, isinstance(child, SiluMulLinear)))
    if model.lm_head is None and model.config.hidden_size % parts == 0:
        # The tied head gets its own blocked copy: the embedding lookup still needs the row layout.
        swaps.append((model, "lm_head", model.embed_tokens.weight, False))
    weights = [w for _, _, w, _ in swaps]
    arena = None
    if weights and all(w.device.type == "cpu" and w.dtype == weights[0].dtype for w in weights):
        arena = _huge_page_arena(sum(w.numel() for w in weights), weights[0].dtype)
    offset = 0
    for module, name, weight, silu_mul_input in swaps:
        storage = None if arena is None else arena[offset:offset + weight.numel()]
        setattr(module, name, ColumnBlockLinear(weight, parts, storage, silu_mul_input))
        offset += weight.numel()
    return len(swaps)


# ---- CPU decode of small batches (LlamaModel.forward's math in far fewer torch calls) ---------------------

_QUANTIZED = (Q41Linear, Q80Linear, W8A8Linear)  # CPU projection modules FlatDecoder calls as they are

# Multi-row GEMMs are packed once for this many rows: oneDNN picks its blocking from the hint, and the
# packed weight serves any row count (a decode batch has 2..32 rows, a verify step 2..k + 1).
_ROWS_HINT = 6
# One packed copy per model projection, shared by every engine over that model (benchmarks build many).
_PACKED: weakref.WeakKeyDictionary[ColumnBlockLinear, torch.Tensor] = weakref.WeakKeyDictionary()


class RowsLinear:
    """A ColumnBlockLinear for T-row products: one row runs the column-block GEMV (FlatDecoder._gemv);
    more rows run oneDNN's packed layout where torch has it, since MKL's sgemm over the blocks costs about
    as much per extra row as the GEMV itself on this AMD EPYC (one thread, 2 → 4 → 8 rows: 16 / 51 / 86 ms
    for the LM head against 11 / 23 / 30 packed, `bench/engine/fused_steps.py` for whole steps). The packed
    copy costs one more copy of the weights (~540 MB fp32 for the embedded model with its head), made
    when the first multi-row step runs: a server that only ever decodes one sequence never pays it."""

    def __init__(self, linear: ColumnBlockLinear) -> None:
        self.linear = linear
        self.packed: torch.Tensor | None = None

    def _pack(self) -> torch.Tensor | None:
        if self.packed is None and torch.backends.mkldnn.is_available():
            if self.linear not in _PACKED:
                _PACKED[self.linear] = torch.ops.mkldnn._reorder_linear_weight(
                    self.linear.weight.contiguous(), _ROWS_HINT)
            self.packed = _PACKED[self.linear]
        return self.packed

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, in] → x Wᵀ [T, out] (+ residual)."""
        if x.shape[0] > 1 and self._pack() is not None:
            out = torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
            return out if residual is None else out.add_(residual)
        return FlatDecoder._gemv(self.linear, x, residual)


class ModuleRows:
    """A quantized projection (Q41Linear, Q80Linear, W8A8Linear: its own kernel takes any row count) over
    T rows; it applies the MLP's silu_mul itself."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return FlatDecoder._gemv(self.module, x, residual)


def rows_linear(module: nn.Module) -> RowsLinear | ModuleRows:
    return RowsLinear(module) if isinstance(module, ColumnBlockLinear) else ModuleRows(module)


class FlatDecoder:
    """Runs one decode step of B sequences (one token each, B = 1 the common case) of a column-blocked fp32
    LlamaModel on CPU, reading the model's own weights; quantized projections (Q41Linear, Q80Linear,
    W8A8Linear: not float linears, so not blocked) run as their modules.

    At bs1 a step is ~60% GEMV and ~40% per-call overhead: the plain forward spends ~55 tiny torch calls and
    9 module calls per layer. This executor runs the same math per layer in ~40 calls, with what the layers
    share computed once per step (rope tables with the softmax scale folded into the query rows). B rows
    share every projection as one [B, K] product (the weights stream once for all of them); attention runs
    per sequence over its own blocks (read as views when consecutive, else gathered). KV goes into the cache
    through store_kv_ref, as on every torch path. The runner falls back to the plain forward for anything
    else. Results equal the forward's up to the order of fp32 roundings (tests/unit/test_cpu_decode_path.py).

    With Q4_1 / Q8_0 projections (`step`), one sequence (over any blocks) runs every layer in one C call
    instead (kernels/cpu_quant/step.py): at 2 threads the ~35 torch calls a layer cost more than its GEMVs.
    """

    def __init__(self, model: LlamaModel, kv: KVCache) -> None:
        if not self.supports(model, kv):
            raise ValueError("FlatDecoder needs fp32 column-blocked or quantized projections and a matching "
                             "fp32 KV cache")
        c = model.config
        self.model = model
        self.kv = kv
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.eps = torch.tensor(c.rms_norm_eps, dtype=torch.float32)
        self.layers = [(layer.input_layernorm.weight, rows_linear(layer.self_attn.qkv_proj),
                        rows_linear(layer.self_attn.o_proj), layer.post_attention_layernorm.weight,
                        rows_linear(layer.mlp.gate_up_proj), rows_linear(layer.mlp.down_proj))
                       for layer in model.layers]
        # The LM head of a multi-row step, packed as the projections are (a blocked or quantized head).
        head = model.lm_head
        blocked_head = isinstance(head, (ColumnBlockLinear, *_QUANTIZED))
        self.head = rows_linear(head) if blocked_head else None
        # Rotary tables per head row of the qkv output: q rows scaled by the softmax scale (exact for
        # power-of-two scales), k rows as is, v rows cos 1 and sin 0 (they pass through unchanged).
        heads, qk_heads = c.num_heads + 2 * c.num_kv_heads, c.num_heads + c.num_kv_heads
        self.cos_scale = torch.ones(heads, 1, 1)
        self.cos_scale[:c.num_heads] = 1.0 / math.sqrt(c.head_dim)
        self.cos_scale[qk_heads:] = 0.0
        self.cos_bias = torch.zeros(heads, 1, 1)
        self.cos_bias[qk_heads:] = 1.0
        self.sin_scale = self.cos_scale * torch.tensor([[-1.0], [1.0]])  # [heads, 2, 1]: rotate-half signs
        self.step = self._fused_step(model, kv)

    @staticmethod
    def _fused_step(model: LlamaModel, kv: KVCache) -> DecodeStep | None:
        """The bs1 step in one C call (kernels/cpu_quant/step.py) when every projection is Q4_1 / Q8_0 on
        fp32 activations (w4a16-native, w8 weight-only) and the norms are fp32; None otherwise."""
        c, layers = model.config, []
        for i, layer in enumerate(model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            projections = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            if (not all(isinstance(m, (Q41Linear, Q80Linear)) for m in projections)
                    or not mlp.down_proj.silu_mul_input or mlp.gate_up_proj.silu_mul_input
                    or not all(w.dtype == torch.float32 and w.is_contiguous() for w in norms)):
                return None
            weights = [Q41Weight(m.packed, m.d, m.m) if isinstance(m, Q41Linear) else Q80Weight(m.q, m.d)
                       for m in projections]
            layers.append(StepLayer(*norms, *weights, kv.k[i], kv.v[i]))
        return DecodeStep(layers, c.num_heads, c.num_kv_heads, c.head_dim, c.rms_norm_eps,
                          1.0 / math.sqrt(c.head_dim))

    @staticmethod
    def supports(model: LlamaModel, kv: KVCache) -> bool:
        projections = [m for layer in model.layers for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                             layer.mlp.gate_up_proj, layer.mlp.down_proj)]
        embed = model.embed_tokens.weight
        return (all(isinstance(m, _QUANTIZED) or (isinstance(m, ColumnBlockLinear)
                                                  and m.weight_blocks.dtype == torch.float32)
                    for m in projections)
                and embed.device.type == "cpu" and embed.dtype == torch.float32
                # fp32 caches only: a quantized one (int8 / uint8 storage) runs the plain forward, whose
                # attention reads its blocks as stored.
                and kv.dtype == torch.float32 and kv.device.type == "cpu"
                and all(t.is_contiguous() for t in kv.k + kv.v))

    @staticmethod
    def _gemv(linear: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, in] → linear(x) [B, out] (+ residual): each block's partial sum takes residual / parts."""
        b = x.shape[0]
        if not isinstance(linear, ColumnBlockLinear):  # quantized: its own kernel
            out = linear(x.view(b, -1))
            return out if residual is None else out.add_(residual)
        # [parts, B, in / parts]: one GEMV (B = 1) or small GEMM per block; at B = 1 a plain view.
        rows = x.view(linear.parts, 1, -1) if b == 1 else x.view(b, linear.parts, -1).transpose(0, 1)
        if residual is None:
            return torch.bmm(rows, linear.weight_blocks).sum(0)
        return torch.baddbmm(residual, rows, linear.weight_blocks, beta=1.0 / linear.parts).sum(0)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's compute_logits, its head packed for several rows."""
        if self.head is None or hidden.shape[0] == 1:
            return self.model.compute_logits(hidden)
        return self.head(hidden).float()

    def _norm(self, s: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """rms_norm_ref's math for contiguous rows [B, H]."""
        norm = torch.linalg.vector_norm(s, dim=-1, keepdim=True)
        return (s * torch.addcmul(self.eps, norm, norm, value=1.0 / s.shape[-1]).rsqrt_()).mul_(weight)

    def __call__(self, token_id: int, position: int, blocks: Sequence[int]) -> torch.Tensor:
        """Final-normed hidden state [1, H] of one sequence's token at `position` (see `decode`)."""
        return self.decode([token_id], [position], [blocks])

    def decode(self, token_ids: Sequence[int], positions: Sequence[int],
               block_tables: Sequence[Sequence[int]]) -> torch.Tensor:
        """Final-normed hidden states [B, H] of B sequences' tokens, sequence j's at positions[j] with its
        context (positions 0..positions[j]) in cache blocks block_tables[j] (at least positions[j] //
        block_size + 1 of them, in order); stores these tokens' KV in every layer. Consecutive blocks are read
        as views, others gathered per layer (a prefix cache hit or a wrapped free list: ~1% of a layer's
        weight bytes at a few hundred tokens)."""
        hq, hk, d = self.num_heads, self.num_kv_heads, self.head_dim
        b, heads, half, group, row = len(token_ids), hq + 2 * hk, d // 2, hq // hk, hk * d
        block_size = self.kv.block_size
        rotary = self.model.rotary
        if b == 1 and self.step is not None and rotary.cos.dtype == torch.float32:
            # One C call for every layer, over any blocks; the tables' row of this position is a view.
            position = positions[0]
            s = self.model.embed_tokens(torch.tensor(token_ids))
            used = torch.tensor(block_tables[0][:position // block_size + 1], dtype=torch.int64)
            self.step(s, rotary.cos[position], rotary.sin[position], used, block_size, position + 1,
                      torch.get_num_threads())
            return self.model.norm(s)
        contexts: list[tuple[int, int, torch.Tensor | None]] = []  # per sequence: length, first slot, gather
        slots: list[int] = []
        for position, blocks in zip(positions, block_tables, strict=True):
            used = blocks[:position // block_size + 1]
            consecutive = list(used) == list(range(used[0], used[0] + len(used)))
            contexts.append((position + 1, used[0] * block_size, None if consecutive else torch.tensor(used)))
            slots.append(used[-1] * block_size + position % block_size)
        ids = torch.tensor([*token_ids, *positions, *slots])
        cos, sin = self.model.rotary(ids[b:2 * b])  # [B, D/2] each
        cos_t = torch.addcmul(self.cos_bias, cos.view(b, 1, 1, half), self.cos_scale)  # [B, heads, 1, D/2]
        sin_t = sin.view(b, 1, 1, half) * self.sin_scale  # [B, heads, 2, D/2]
        slot = ids[2 * b:]
        s = self.model.embed_tokens(ids[:b])  # the residual stream [B, H]
        for i, (w_in, qkv_proj, o_proj, w_post, gate_up_proj, down_proj) in enumerate(self.layers):
            qkv = qkv_proj(self._norm(s, w_in)).view(b, heads, 2, half)
            rot = torch.addcmul(qkv * cos_t, qkv.flip(2), sin_t)  # rotate-half: halves swapped, sin signed
            k_cache, v_cache = self.kv.k[i], self.kv.v[i]
            # These tokens' rotated k heads and their v heads (rotated by cos 1, sin 0): [B, Hk, D] views.
            store_kv_ref(rot.as_strided((b, hk, d), (heads * d, d, 1), hq * d),
                         rot.as_strided((b, hk, d), (heads * d, d, 1), (hq + hk) * d), k_cache, v_cache, slot)
            outs = []
            for j, (seq_len, first_slot, gather) in enumerate(contexts):
                if gather is None:
                    start = k_cache.storage_offset() + first_slot * row
                    keys_t = k_cache.as_strided((hk, d, seq_len), (d, 1, row), start)  # [Hk, D, S]
                    values = v_cache.as_strided((hk, seq_len, d), (d, row, 1), start)  # [Hk, S, D]
                else:
                    keys_t = k_cache.index_select(0, gather).view(-1, hk, d)[:seq_len].permute(1, 2, 0)
                    values = v_cache.index_select(0, gather).view(-1, hk, d)[:seq_len].transpose(0, 1)
                q = rot.as_strided((hk, group, d), (group * d, d, 1), j * heads * d)  # already scaled
                outs.append(torch.bmm(torch.bmm(q, keys_t).softmax(dim=-1), values))  # [Hk, G, D]: heads
            attn = (outs[0] if b == 1 else torch.cat(outs)).view(b, hq * d)
            s = o_proj(attn, residual=s)
            gate_up = gate_up_proj(self._norm(s, w_post))
            if isinstance(down_proj, RowsLinear):  # a quantized one applies silu_mul itself
                gate, up = gate_up.chunk(2, dim=-1)
                gate_up = F.silu(gate, inplace=True).mul_(up)
            s = down_proj(gate_up, residual=s)
        return self.model.norm(s)
