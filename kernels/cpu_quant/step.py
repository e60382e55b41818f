"""A bs1 decode step of Q4_1 / Q8_0 layers in one C call (decode_step.c's cq_decode_step)."""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from kernels.cpu_quant.layout import Q41Weight, Q80Weight
from kernels.cpu_quant.library import library


class _Linear(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int64), ("n", ctypes.c_int64), ("k", ctypes.c_int64),
                ("w", ctypes.c_void_p), ("d", ctypes.c_void_p), ("m", ctypes.c_void_p)]


class _Layer(ctypes.Structure):
    _fields_ = [("norm_in", ctypes.c_void_p), ("norm_post", ctypes.c_void_p), ("qkv", _Linear),
                ("o", _Linear), ("gate_up", _Linear), ("down", _Linear), ("k_cache", ctypes.c_void_p),
                ("v_cache", ctypes.c_void_p)]


@dataclass(frozen=True)
class StepLayer:
    """One layer as the step reads it: its two RMSNorm weights, the four projections' quantized weights
    (down's input is silu(gate) · up, applied in C), its KV cache tensors ([blocks, block_size, Hk, D])."""

    norm_in: torch.Tensor
    norm_post: torch.Tensor
    qkv: Q41Weight | Q80Weight
    o: Q41Weight | Q80Weight
    gate_up: Q41Weight | Q80Weight
    down: Q41Weight | Q80Weight
    k_cache: torch.Tensor
    v_cache: torch.Tensor


def _linear(weight: Q41Weight | Q80Weight) -> _Linear:
    n, k = weight.shape
    if isinstance(weight, Q41Weight):
        return _Linear(0, n, k, weight.packed.data_ptr(), weight.d.data_ptr(), weight.m.data_ptr())
    return _Linear(1, n, k, weight.q.data_ptr(), weight.d.data_ptr(), None)


class DecodeStep:
    """Runs one token of one sequence through every layer in one call (see cq_decode_step), over any blocks.

    The structs hold raw pointers to the given tensors, so they are kept here: build a new DecodeStep if a
    layer's tensors are replaced (a .to(), a state dict assigned)."""

    def __init__(self, layers: list[StepLayer], num_heads: int, num_kv_heads: int, head_dim: int,
                 eps: float, q_scale: float, lib: ctypes.CDLL | None = None) -> None:
        for layer in layers:
            tensors = (layer.norm_in, layer.norm_post, layer.k_cache, layer.v_cache)
            if not all(t.dtype == torch.float32 and t.is_contiguous() and t.is_cpu for t in tensors):
                raise ValueError("the fused decode step needs contiguous fp32 CPU norms and KV caches")
        self.layers = layers  # keeps every pointed-to tensor alive
        self.structs = (_Layer * len(layers))(*[
            _Layer(lay.norm_in.data_ptr(), lay.norm_post.data_ptr(), _linear(lay.qkv), _linear(lay.o),
                   _linear(lay.gate_up), _linear(lay.down), lay.k_cache.data_ptr(), lay.v_cache.data_ptr())
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
