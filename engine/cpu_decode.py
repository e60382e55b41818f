"""CPU decode path: a flat small-batch decode step over F32Linear or quantized projections (same math)."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engine.cpu_linear import F32Linear
from engine.kv_cache import KVCache
from engine.model import LlamaModel
from engine.quantize.cpu_linears import Q41Linear, Q80Linear
from engine.quantize.w8a8 import W8A8Linear
from kernels.cpu_quant.f32_ops import f32_linear
from kernels.cpu_quant.kv_rows import KVRows
from kernels.cpu_quant.layout import F32Weight, Q41Weight, Q80Weight
from kernels.cpu_quant.step import DecodeStep, StepLayer, supports_kv
from kernels.store_kv.quant import dequantize_blocks
from kernels.store_kv.reference import store_kv_ref

# ---- CPU decode of small batches (LlamaModel.forward's math in far fewer torch calls) ---------------------

_QUANTIZED = (Q41Linear, Q80Linear, W8A8Linear)  # CPU projection modules FlatDecoder calls as they are


class RowsLinear:
    """An F32Linear over T rows (the kernel reads its weight once for all of them); the MLP's silu_mul is
    applied by the caller."""

    def __init__(self, linear: F32Linear) -> None:
        self.linear = linear

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, in] → x Wᵀ [T, out] (+ residual)."""
        return FlatDecoder._gemv(self.linear, x, residual)


class ModuleRows:
    """A quantized projection (Q41Linear, Q80Linear, W8A8Linear: its own kernel takes any row count) over
    T rows; it applies the MLP's silu_mul itself."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return FlatDecoder._gemv(self.module, x, residual)


def rows_linear(module: nn.Module) -> RowsLinear | ModuleRows:
    return RowsLinear(module) if isinstance(module, F32Linear) else ModuleRows(module)


def step_weight(module: Q41Linear | Q80Linear | F32Linear) -> Q41Weight | Q80Weight | F32Weight:
    """A projection's weight as the C step streams it."""
    if isinstance(module, Q41Linear):
        return Q41Weight(module.packed, module.d, module.m)
    if isinstance(module, Q80Linear):
        return Q80Weight(module.q, module.d)
    return F32Weight(module.packed)


class FlatDecoder:
    """Runs one decode step of B sequences (one token each, B = 1 the common case) of an F32Linear fp32
    LlamaModel on CPU, reading the model's own weights; quantized projections (Q41Linear, Q80Linear,
    W8A8Linear: their own kernels) run as their modules.

    At bs1 a step is ~60% GEMV and ~40% per-call overhead: the plain forward spends ~55 tiny torch calls and
    9 module calls per layer. This executor runs the same math per layer in ~40 calls, with what the layers
    share computed once per step (rope tables with the softmax scale folded into the query rows). B rows
    share every projection as one [B, K] product (the weights stream once for all of them); attention runs
    per sequence over its own blocks (read as views when consecutive, else gathered). KV goes into the cache
    through store_kv_ref, as on every torch path; an int8 / int4 cache is stored and read in C instead
    (`kv_rows`: kernels/cpu_quant/kv_rows.py, the bs1 step's own store and attention). The split-fused and
    verify rows (engine/executors) read a quantized cache's blocks dequantized, as the reference does. The
    runner falls back to the plain forward for anything else. Results equal the forward's up to the order of
    fp32 roundings (tests/unit/test_cpu_decode_path.py).

    With Q4_1 / Q8_0 / F32Linear projections (`step`), one sequence (over any blocks) runs every layer in one
    C call instead (kernels/cpu_quant/step.py): at 2 threads the ~35 torch calls a layer cost more than its
    GEMVs. The C step stores into and reads float32, int8 and int4 caches in place.
    """

    def __init__(self, model: LlamaModel, kv: KVCache) -> None:
        if not self.supports(model, kv):
            raise ValueError("FlatDecoder needs F32Linear or quantized projections and a CPU KV cache "
                             "of float32, int8 or int4")
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
        blocked_head = isinstance(head, (F32Linear, *_QUANTIZED))
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
        # Batch rows over an int8 / int4 cache: kv_quant.c's store and attention (the bs1 step's own).
        layers = [kv.layer(i) for i in range(len(model.layers))]
        self.kv_rows = (KVRows(layers, c.num_heads) if kv.spec.is_quantized
                        and all(supports_kv(k) and supports_kv(v) for k, v in layers) else None)

    @staticmethod
    def _fused_step(model: LlamaModel, kv: KVCache) -> DecodeStep | None:
        """The bs1 step in one C call (kernels/cpu_quant/step.py) when every projection is Q4_1, Q8_0 or
        F32Linear on fp32 activations (w4a16-native, w8 weight-only, fp32) and the norms are fp32; None
        otherwise (W8A8)."""
        c, layers = model.config, []
        for i, layer in enumerate(model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            projections = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            if (not all(isinstance(m, (Q41Linear, Q80Linear, F32Linear)) for m in projections)
                    or not mlp.down_proj.silu_mul_input or mlp.gate_up_proj.silu_mul_input
                    or not all(w.dtype == torch.float32 and w.is_contiguous() for w in norms)):
                return None
            weights = [step_weight(m) for m in projections]
            k_cache, v_cache = kv.layer(i)
            if not (supports_kv(k_cache) and supports_kv(v_cache)):
                return None
            layers.append(StepLayer(*norms, *weights, k_cache, v_cache))
        return DecodeStep(layers, c.num_heads, c.num_kv_heads, c.head_dim, c.rms_norm_eps,
                          1.0 / math.sqrt(c.head_dim))

    @staticmethod
    def supports(model: LlamaModel, kv: KVCache) -> bool:
        projections = [m for layer in model.layers for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                             layer.mlp.gate_up_proj, layer.mlp.down_proj)]
        embed = model.embed_tokens.weight
        return (all(isinstance(m, (F32Linear, *_QUANTIZED)) for m in projections)
                and embed.device.type == "cpu" and embed.dtype == torch.float32
                and (kv.dtype == torch.float32 or kv.spec.is_quantized) and kv.device.type == "cpu"
                and all(t.is_contiguous() for t in kv.k + kv.v))

    @staticmethod
    def _gemv(linear: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, in] → linear(x) [B, out] (+ residual); an F32Linear adds the residual in its kernel and
        leaves silu_mul to the caller."""
        if isinstance(linear, F32Linear):
            return f32_linear(x, linear.packed, residual)
        out = linear(x.view(x.shape[0], -1))  # quantized: its own kernel
        return out if residual is None else out.add_(residual)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's compute_logits, its head packed for several rows."""
        if self.head is None or hidden.shape[0] == 1:
            return self.model.compute_logits(hidden)
        return self.head(hidden).float()

    def row_inputs(self, token_ids: Sequence[int], positions: Sequence[int],
                   slots: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """R rows' residual stream [R, H] (their token embeddings), rotary tables per head row of the qkv
        output (cos [R, heads, 1, D/2], sin [R, heads, 2, D/2]) and cache slots [R]: one host copy."""
        r, half = len(token_ids), self.head_dim // 2
        ids = torch.tensor([*token_ids, *positions, *slots])
        cos, sin = self.model.rotary(ids[r:2 * r])  # [R, D/2] each
        cos_t = torch.addcmul(self.cos_bias, cos.view(r, 1, 1, half), self.cos_scale)
        sin_t = sin.view(r, 1, 1, half) * self.sin_scale
        return self.model.embed_tokens(ids[:r]), cos_t, sin_t, ids[2 * r:]

    def context(self, layer: int, seq_len: int, first_slot: int,
                gather: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s cached keys, transposed [Hk, D, S], and values [Hk, S, D] of a sequence's first
        seq_len positions: views of consecutive blocks from slot first_slot, or `gather`ed blocks (their ids,
        a prefix cache hit or a wrapped free list); an int8 / int4 cache's blocks dequantized."""
        k_cache, v_cache = self.kv.layer(layer)
        hk, d = self.num_kv_heads, self.head_dim
        if self.kv.spec.is_quantized:
            if gather is None:  # the consecutive blocks from first_slot's
                first = first_slot // self.kv.block_size
                gather = torch.arange(first, first + -(-seq_len // self.kv.block_size))
            keys = dequantize_blocks(k_cache, gather, torch.float32).view(-1, hk, d)[:seq_len]
            values = dequantize_blocks(v_cache, gather, torch.float32).view(-1, hk, d)[:seq_len]
            return keys.permute(1, 2, 0), values.transpose(0, 1)
        if gather is None:
            row = hk * d
            start = k_cache.storage_offset() + first_slot * row
            return (k_cache.as_strided((hk, d, seq_len), (d, 1, row), start),
                    v_cache.as_strided((hk, seq_len, d), (d, row, 1), start))
        return (k_cache.index_select(0, gather).view(-1, hk, d)[:seq_len].permute(1, 2, 0),
                v_cache.index_select(0, gather).view(-1, hk, d)[:seq_len].transpose(0, 1))

    def mlp(self, s: torch.Tensor, w_post: torch.Tensor, gate_up_proj: RowsLinear | ModuleRows,
            down_proj: RowsLinear | ModuleRows) -> torch.Tensor:
        """The layer's MLP over rows [T, H] with its residual: s + down(silu·mul(gate_up(norm(s))))."""
        gate_up = gate_up_proj(self._norm(s, w_post))
        if isinstance(down_proj, RowsLinear):  # a quantized one applies silu_mul itself
            gate, up = gate_up.chunk(2, dim=-1)
            gate_up = F.silu(gate, inplace=True).mul_(up)
        return down_proj(gate_up, residual=s)

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
        b, heads, half, group = len(token_ids), hq + 2 * hk, d // 2, hq // hk
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
            gather = None if consecutive and self.kv_rows is None else torch.tensor(used, dtype=torch.int64)
            contexts.append((position + 1, used[0] * block_size, gather))
            slots.append(used[-1] * block_size + position % block_size)
        s, cos_t, sin_t, slot = self.row_inputs(token_ids, positions, slots)
        for i, (w_in, qkv_proj, o_proj, w_post, gate_up_proj, down_proj) in enumerate(self.layers):
            qkv = qkv_proj(self._norm(s, w_in)).view(b, heads, 2, half)
            rot = torch.addcmul(qkv * cos_t, qkv.flip(2), sin_t)  # rotate-half: halves swapped, sin signed
            # These tokens' rotated k heads and their v heads (rotated by cos 1, sin 0): [B, Hk, D] views.
            k_rows = rot.as_strided((b, hk, d), (heads * d, d, 1), hq * d)
            v_rows = rot.as_strided((b, hk, d), (heads * d, d, 1), (hq + hk) * d)
            if self.kv_rows is not None:  # an int8 / int4 cache: stored and read in C, as the bs1 step does
                self.kv_rows.store(i, k_rows.contiguous(), v_rows.contiguous(), slot)
                outs = [self.kv_rows.attend(i, rot[j, :hq].view(hq, d), gather, seq_len)
                        for j, (seq_len, _, gather) in enumerate(contexts)]
            else:
                store_kv_ref(k_rows, v_rows, *self.kv.layer(i), slot)
                outs = []
                for j, (seq_len, first_slot, gather) in enumerate(contexts):
                    keys_t, values = self.context(i, seq_len, first_slot, gather)
                    q = rot.as_strided((hk, group, d), (group * d, d, 1), j * heads * d)  # already scaled
                    outs.append(torch.bmm(torch.bmm(q, keys_t).softmax(dim=-1), values))  # [Hk, G, D]: heads
            attn = (outs[0] if b == 1 else torch.cat(outs)).view(b, hq * d)
            s = self.mlp(o_proj(attn, residual=s), w_post, gate_up_proj, down_proj)
        return self.model.norm(s)
