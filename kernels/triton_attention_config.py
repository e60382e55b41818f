"""Launch configuration of the Triton attention kernels: split-K counts and tile sizes (tuned on an H100)."""
from __future__ import annotations

import functools

import torch
import triton

# Split-K bounds (bench/attention_splits_gpu.py): 64-token splits let a bs1 decode over a short context use
# the GPU (ctx512: 2 -> 8 live splits, ~15.7 -> ~7.5 us a layer); 32 is the most the sweep tried.
_MIN_TOKENS_PER_SPLIT = 64
_MAX_SPLITS = 32


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # interpreter: any small number; it only shapes the split heuristic
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """KV splits per (sequence, KV head): enough programs for ~2 waves on the GPU, >= 64 tokens per split."""
    programs = num_seqs * num_kv_heads
    wanted = -(-2 * _num_sms(device) // max(programs, 1))
    by_length = max(max_seq_len // _MIN_TOKENS_PER_SPLIT, 1)
    return max(1, min(wanted, by_length, _MAX_SPLITS))


def decode_config(head_dim: int, interpreted: bool) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) of the decode kernel (H100 sweep: within 2% of the best at 8B)."""
    if interpreted:
        return 16, 1, 1  # the interpreter's cost grows with tile size
    return (64, 4, 3) if head_dim <= 128 else (32, 4, 2)


def prefill_config(head_dim: int, max_query_len: int, interpreted: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the prefill kernel (H100 sweep: 64/64/4/3 led, D=128)."""
    if interpreted:
        return 16, 16, 1, 1
    # Short chunks (speculative verification, small tails) get short row tiles instead of padding to 64.
    rows = max(16, triton.next_power_of_2(max_query_len))
    if head_dim <= 128:
        return min(64, rows), 64, 4, 3
    return min(32, rows), 32, 4, 2
