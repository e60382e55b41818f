"""A bs1 decode step of Q4_1 / Q8_0 / packed fp32 layers in one C call (decode_step.c's cq_decode_step), over
a float32, int8 or int4 KV cache (kv_quant.c stores and reads the quantized ones in place)."""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from kernels.cpu_quant.layout import F32Weight, Q41Weight, Q80Weight
from kernels.cpu_quant.library import library
from kernels.store_kv.quant import QuantizedKV

KV_MAX_HEAD_DIM = 256  # cpu_quant.h: the quantized store's and reader's row buffers


class _Linear(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int64), ("n", ctypes.c_int64), ("k", ctypes.c_int64),
                ("w", ctypes.c_void_p), ("d", ctypes.c_void_p), ("m", ctypes.c_void_p)]


class _KV(ctypes.Structure):  # cpu_quant.h cq_kv
    _fields_ = [("kind", ctypes.c_int64), ("group", ctypes.c_int64), ("hadamard", ctypes.c_int64),
                ("codes", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("zero", ctypes.c_void_p),
                ("offset", ctypes.c_void_p)]


class _Layer(ctypes.Structure):
    _fields_ = [("norm_in", ctypes.c_void_p), ("norm_post", ctypes.c_void_p), ("qkv", _Linear),
                ("o", _Linear), ("gate_up", _Linear), ("down", _Linear), ("k_cache", _KV), ("v_cache", _KV)]


@dataclass(frozen=True)
class StepLayer:
    """One layer as the step reads it: its two RMSNorm weights, the four projections' weights (Q4_1, Q8_0 or
    packed fp32; down's input is silu(gate) · up, applied in C), its KV cache: float32 tensors ([blocks,
    block_size, Hk, D]) or int8 / int4 QuantizedKV (KVCache.layer)."""

    norm_in: torch.Tensor
    norm_post: torch.Tensor
    qkv: Q41Weight | Q80Weight | F32Weight
    o: Q41Weight | Q80Weight | F32Weight
    gate_up: Q41Weight | Q80Weight | F32Weight
    down: Q41Weight | Q80Weight | F32Weight
    k_cache: torch.Tensor | QuantizedKV
    v_cache: torch.Tensor | QuantizedKV


def _linear(weight: Q41Weight | Q80Weight | F32Weight) -> _Linear:
    n, k = weight.shape
    if isinstance(weight, Q41Weight):
        return _Linear(0, n, k, weight.packed.data_ptr(), weight.d.data_ptr(), weight.m.data_ptr())
    if isinstance(weight, F32Weight):
        return _Linear(2, n, k, weight.packed.data_ptr(), None, None)
    return _Linear(1, n, k, weight.q.data_ptr(), weight.d.data_ptr(), None)


def kv_struct(cache: torch.Tensor | QuantizedKV) -> _KV:
    """A cache as cpu_quant.h's cq_kv (raw pointers: the caller keeps the tensors alive)."""
    if not isinstance(cache, QuantizedKV):
        return _KV(0, 0, 0, cache.data_ptr(), None, None, None)
    zero = None if cache.zero is None else cache.zero.data_ptr()
    offset = None if cache.offset is None else cache.offset.data_ptr()
    return _KV(1 if cache.bits == 8 else 2, cache.group_size, int(cache.hadamard), cache.codes.data_ptr(),
               cache.scale.data_ptr(), zero, offset)


def _kv_tensors(cache: torch.Tensor | QuantizedKV) -> list[torch.Tensor]:
    """The tensors the step reads of a cache."""
    if not isinstance(cache, QuantizedKV):
        return [cache]
    return [t for t in (cache.codes, cache.scale, cache.zero, cache.offset) if t is not None]


def supports_kv(cache: torch.Tensor | QuantizedKV) -> bool:
    """Whether the step stores into and reads this cache: contiguous CPU float32, or int8 / int4 with float16
    scales (int4: groups that divide D, D a power of two when rotated) and D within its row buffers."""
    if not all(t.is_cpu and t.is_contiguous() for t in _kv_tensors(cache)):
        return False
    if not isinstance(cache, QuantizedKV):
        return cache.dtype == torch.float32
    d = cache.shape[-1]
    if cache.scale.dtype != torch.float16 or d > KV_MAX_HEAD_DIM:
        return False
    if cache.bits == 4:
        return (cache.zero is not None and cache.zero.dtype == torch.float16 and d % cache.group_size == 0
                and not (cache.hadamard and d & (d - 1)))
    return True


class DecodeStep:
    """Runs one token of one sequence through every layer in one call (see cq_decode_step), over any blocks.

    The structs hold raw pointers to the given tensors, so they are kept here: build a new DecodeStep if a
    layer's tensors are replaced (a .to(), a state dict assigned)."""

    def __init__(self, layers: list[StepLayer], num_heads: int, num_kv_heads: int, head_dim: int,
                 eps: float, q_scale: float, lib: ctypes.CDLL | None = None) -> None:
        for layer in layers:
            norms = (layer.norm_in, layer.norm_post)
            if not all(t.dtype == torch.float32 and t.is_contiguous() and t.is_cpu for t in norms):
                raise ValueError("the fused decode step needs contiguous fp32 CPU norms")
            if not (supports_kv(layer.k_cache) and supports_kv(layer.v_cache)):
                raise ValueError("the fused decode step needs contiguous CPU KV caches: float32, or int8 / "
                                 f"int4 with float16 scales and head_dim <= {KV_MAX_HEAD_DIM}")
        self.layers = layers  # keeps every pointed-to tensor alive
        self.structs = (_Layer * len(layers))(*[
            _Layer(lay.norm_in.data_ptr(), lay.norm_post.data_ptr(), _linear(lay.qkv), _linear(lay.o),
                   _linear(lay.gate_up), _linear(lay.down), kv_struct(lay.k_cache), kv_struct(lay.v_cache))
            for lay in layers])
        self.dims = (len(layers), num_heads, num_kv_heads, head_dim, eps, q_scale)
        self.address = ctypes.addressof(self.structs)
        self.fn = (lib or library()).cq_decode_step  # `lib`: another build (the tests' scalar one)

    def __call__(self, s: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, blocks: torch.Tensor,
                 block_size: int, seq_len: int, threads: int) -> torch.Tensor:
        """s: the residual stream [1, H] fp32 contiguous, updated in place and returned; cos, sin: [D/2] of
        the token's position seq_len - 1; blocks: int64, the cache blocks of positions 0..seq_len - 1 in
        order (at least (seq_len - 1) // block_size + 1). The token's KV is stored first."""
        if not (cos.is_contiguous() and sin.is_contiguous() and s.is_contiguous()):
            raise ValueError("s, cos and sin must be contiguous")
        if blocks.dtype != torch.int64 or blocks.numel() * block_size < seq_len:
            raise ValueError(f"{seq_len} positions need int64 blocks of {block_size} slots, got "
                             f"{blocks.numel()} {blocks.dtype}")
        self.fn(self.address, *self.dims, cos.data_ptr(), sin.data_ptr(), blocks.data_ptr(), block_size,
                seq_len, s.data_ptr(), threads)
        return s
