"""FlatDecoder's batch rows over an int8 / int4 KV cache in C (kv_quant.c): B tokens' rows stored as
kernels/store_kv/quant.py stores them, and one sequence's attention over the codes in place — the same
functions the bs1 step (step.py) calls, so a batch row and a bs1 step store and read alike."""
from __future__ import annotations

import ctypes

import torch

from kernels.cpu_quant.library import library
from kernels.cpu_quant.step import kv_struct, supports_kv
from kernels.store_kv.quant import QuantizedKV


class KVRows:
    """Every layer's quantized k / v caches as C structs (built once; they hold raw pointers, so build a new
    KVRows if the cache tensors are replaced)."""

    def __init__(self, layers: list[tuple[QuantizedKV, QuantizedKV]], num_heads: int,
                 lib: ctypes.CDLL | None = None) -> None:
        if not all(supports_kv(k) and supports_kv(v) for k, v in layers):
            raise ValueError("KVRows needs contiguous CPU int8 / int4 caches the C store reads (supports_kv)")
        self.layers = layers  # keeps every pointed-to tensor alive
        self.structs = [(kv_struct(k), kv_struct(v)) for k, v in layers]
        k0 = layers[0][0]
        self.num_kv_heads, self.head_dim, self.block_size = k0.shape[2], k0.shape[3], k0.shape[1]
        self.group = num_heads // self.num_kv_heads
        self.lib = lib or library()

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """k, v: contiguous float32 [T, Hk, D] rows into cache slots `slots` (int64 [T])."""
        k_struct, v_struct = self.structs[layer]
        for rows, struct in ((k, k_struct), (v, v_struct)):
            self.lib.cq_kv_store_rows(ctypes.byref(struct), slots.data_ptr(), slots.numel(), rows.data_ptr(),
                                      self.num_kv_heads, self.head_dim)

    def attend(self, layer: int, q: torch.Tensor, blocks: torch.Tensor, seq_len: int) -> torch.Tensor:
        """q: contiguous float32 [Hq, D] query heads (softmax scale folded in) of a sequence whose positions
        0 .. seq_len - 1 sit in `blocks` (int64, in order) → the attention output [Hq, D]."""
        k_struct, v_struct = self.structs[layer]
        out = torch.empty_like(q)
        self.lib.cq_kv_attend_heads(q.data_ptr(), self.group, ctypes.byref(k_struct), ctypes.byref(v_struct),
                                    blocks.data_ptr(), self.block_size, self.num_kv_heads, seq_len,
                                    self.head_dim, out.data_ptr(), torch.get_num_threads())
        return out

