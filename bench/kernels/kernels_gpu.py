"""Times each Triton kernel vs its torch reference and the H100 roofline at Llama-3-8B shapes; prints a table.

Run from the repo root on a CUDA machine: `python -m bench.kernels.kernels_gpu` (`--quick`: fewer shapes).
Columns: torch reference (eager), Triton eager (includes Python launch cost, which dominates small problems)
and Triton replayed from a CUDA graph (GPU time). Roofline = max(bytes moved / peak bandwidth, FLOPs / peak
bf16 tensor throughput) with H100 SXM datasheet defaults; override with --bw-gbps / --tflops. Small shapes
replayed from a graph can sit in L2 (50 MB) and then read above 100% of the HBM roofline.
"% roof", GB/s and TFLOP/s use the graph time.
"""
from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bench._cuda import cuda_missing
from kernels.attention.metadata import AttentionMetadata, SeqSpan
from kernels.attention.reference import paged_attention_ref
from kernels.rmsnorm.reference import rms_norm_ref
from kernels.rotary.reference import apply_rotary_ref
from kernels.store_kv.reference import store_kv_ref

HEADS, KV_HEADS, HEAD_DIM, HIDDEN, BLOCK = 32, 8, 128, 4096, 16
DTYPE = torch.bfloat16
ELEM = 2  # bytes per bf16 element


@dataclass(frozen=True)
class Case:
    kernel: str
    shape: str
    triton_fn: Callable[[], object]
    torch_fn: Callable[[], object]
    bytes_moved: float
    flops: float = 0.0


def time_ms(fn: Callable[[], object]) -> float:
    """Eager: includes the Python launch cost whenever that exceeds the GPU time (small problems)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100)


def graph_time_ms(fn: Callable[[], object]) -> float:
    """GPU time alone: the call replayed from a CUDA graph, as a captured decode step runs it."""
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(fn, rep=100)


def paged_batch(seqs: list[tuple[int, int]], seed: int = 0):
    """seqs: (cached, new) per sequence, over shuffled blocks of a bf16 cache (8 blocks more than they use)
    already holding every position's KV; seeded, so a test and a timing see the same batch.
    tests/gpu uses it too."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    needed = [-(-(c + n) // BLOCK) for c, n in seqs]
    pool = list(range(sum(needed) + 8))
    random.Random(seed).shuffle(pool)
    shape = (len(pool), BLOCK, KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, generator=gen, device="cuda", dtype=DTYPE)
    v_cache = torch.randn(shape, generator=gen, device="cuda", dtype=DTYPE)
    spans, slots, row = [], [], 0
    for (cached, new), count in zip(seqs, needed, strict=True):
        blocks = tuple(pool.pop() for _ in range(count))
        spans.append(SeqSpan(row, new, cached + new, blocks, None))
        slots += [blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(cached, cached + new)]
        row += new
    meta = AttentionMetadata.from_spans(spans, slots, BLOCK, device="cuda")
    q = torch.randn(row, HEADS, HEAD_DIM, generator=gen, device="cuda", dtype=DTYPE)
    return q, k_cache, v_cache, meta


def attention_cases(quick: bool) -> list[Case]:
    from kernels.attention.kernel import paged_attention_triton

    scale = HEAD_DIM ** -0.5
    shapes: list[tuple[str, list[tuple[int, int]]]] = []
    for batch in ([1, 64] if quick else [1, 8, 32, 64]):
        for context in [512, 4096]:
            shapes.append((f"decode B={batch} ctx={context}", [(context - 1, 1)] * batch))
    shapes.append(("prefill 1x4096", [(0, 4096)]))
    shapes.append(("chunk 512 after 3584", [(3584, 512)]))
    if not quick:
        shapes.append(("prefill 8x512", [(0, 512)] * 8))
        shapes.append(("mixed 32 decodes + chunk 512", [(4095, 1)] * 32 + [(1024, 512)]))
    cases = []
    for name, seqs in shapes:
        q, k_cache, v_cache, meta = paged_batch(seqs)
        kv_tokens = sum(c + n for c, n in seqs)
        # Each query row attends to its context plus its causal prefix in the chunk.
        visible = sum(n * c + n * (n + 1) // 2 for c, n in seqs)
        bytes_moved = 2 * kv_tokens * KV_HEADS * HEAD_DIM * ELEM + 2 * q.numel() * ELEM
        flops = 4.0 * visible * HEADS * HEAD_DIM
        cases.append(Case("paged_attention", name,
                          lambda q=q, k=k_cache, v=v_cache, m=meta: paged_attention_triton(q, k, v, m, scale),
                          lambda q=q, k=k_cache, v=v_cache, m=meta: paged_attention_ref(q, k, v, m, scale),
                          bytes_moved, flops))
    return cases


def elementwise_cases(quick: bool) -> list[Case]:
    from kernels.rmsnorm.kernel import rms_norm_triton
    from kernels.rotary.kernel import apply_rotary_triton
    from kernels.store_kv.kernel import store_kv_triton

    cases = []
    for tokens in ([64, 4096] if quick else [1, 64, 512, 4096]):
        x = torch.randn(tokens, HIDDEN, device="cuda", dtype=DTYPE)
        res = torch.randn_like(x)
        w = torch.randn(HIDDEN, device="cuda", dtype=DTYPE)
        # read x, residual; write out, new residual (weight is negligible)
        cases.append(Case("rms_norm+residual", f"T={tokens} H={HIDDEN}",
                          lambda x=x, r=res, w=w: rms_norm_triton(x, w, 1e-5, r),
                          lambda x=x, r=res, w=w: rms_norm_ref(x, w, 1e-5, r), 4 * x.numel() * ELEM))

        fused = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device="cuda", dtype=DTYPE)
        q = fused[:, :HEADS * HEAD_DIM].view(tokens, HEADS, HEAD_DIM)
        k = fused[:, HEADS * HEAD_DIM:(HEADS + KV_HEADS) * HEAD_DIM].view(tokens, KV_HEADS, HEAD_DIM)
        v = fused[:, (HEADS + KV_HEADS) * HEAD_DIM:].view(tokens, KV_HEADS, HEAD_DIM)
        cos = torch.rand(tokens, HEAD_DIM // 2, device="cuda", dtype=DTYPE)
        sin = torch.rand_like(cos)
        qk_bytes = 2 * (q.numel() + k.numel()) * ELEM + 2 * cos.numel() * ELEM
        cases.append(Case("apply_rotary", f"T={tokens} {HEADS}/{KV_HEADS}x{HEAD_DIM}",
                          lambda q=q, k=k, c=cos, s=sin: apply_rotary_triton(q, k, c, s),
                          lambda q=q, k=k, c=cos, s=sin: apply_rotary_ref(q, k, c, s), qk_bytes))

        num_blocks = tokens // BLOCK + 64
        k_cache = torch.zeros(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
        v_cache = torch.zeros_like(k_cache)
        slots = torch.randperm(num_blocks * BLOCK, device="cuda")[:tokens]
        cases.append(Case("store_kv", f"T={tokens} {KV_HEADS}x{HEAD_DIM}",
                          lambda k=k, v=v, kc=k_cache, vc=v_cache, s=slots: store_kv_triton(k, v, kc, vc, s),
                          lambda k=k, v=v, kc=k_cache, vc=v_cache, s=slots: store_kv_ref(k, v, kc, vc, s),
                          4 * k.numel() * ELEM))
    return cases


def rotary_store_cases(quick: bool) -> list[Case]:
    """The decode step's fused rotary + KV store into a bf16, int8 and int4 cache (the engine's specs): q
    rotated into a fresh tensor, k rotated and v written into their slots, quantized as they are stored."""
    from contracts.kv_cache_spec import KVCacheSpec, scales_for
    from engine.kv_cache import KVCache
    from kernels.rotary.kernel import rotary_store_kv_triton
    from kernels.rotary.reference import rotary_store_kv_ref

    cases = []
    for tokens in ([1, 64] if quick else [1, 16, 64, 512]):
        fused = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device="cuda", dtype=DTYPE)
        q, k, v = fused.view(tokens, HEADS + 2 * KV_HEADS, HEAD_DIM).split([HEADS, KV_HEADS, KV_HEADS], 1)
        cos = torch.rand(tokens, HEAD_DIM // 2, device="cuda", dtype=DTYPE)
        sin = torch.rand_like(cos)
        num_blocks = tokens // BLOCK + 64
        slots = torch.randperm(num_blocks * BLOCK, device="cuda")[:tokens]
        for dtype in ("bfloat16", "int8", "int4"):
            cache = KVCache(KVCacheSpec(BLOCK, KV_HEADS, HEAD_DIM, dtype, scales_for(dtype, HEAD_DIM)), 1,
                            num_blocks, "cuda")
            kc, vc = cache.layer(0)
            # read q, k, v and the tables; write q and the stored K + V rows with their scales
            stored = tokens * cache.spec.bytes_per_block / BLOCK
            moved = (fused.numel() + 2 * cos.numel() + q.numel()) * ELEM + stored
            cases.append(Case("rotary_store_kv", f"T={tokens} {dtype} cache",
                              lambda q=q, k=k, v=v, c=cos, s=sin, kc=kc, vc=vc, sl=slots:
                              rotary_store_kv_triton(q, k, v, c, s, kc, vc, sl),
                              lambda q=q, k=k, v=v, c=cos, s=sin, kc=kc, vc=vc, sl=slots:
                              rotary_store_kv_ref(q, k, v, c, s, kc, vc, sl), moved))
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--bw-gbps", type=float, default=3350.0, help="peak HBM GB/s (H100 SXM: 3350)")
    parser.add_argument("--tflops", type=float, default=989.0, help="peak dense bf16 TFLOP/s (H100 SXM: 989)")
    parser.add_argument("--only", default="", help="substring filter on the kernel name")
    args = parser.parse_args(argv)
    if cuda_missing(__file__):
        return 2
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | "
          f"roofline: {args.bw_gbps:.0f} GB/s, {args.tflops:.0f} TFLOP/s")
    header = (f"{'kernel':<18} {'shape':<30} {'torch ms':>9} {'triton ms':>9} {'graph ms':>9} {'speedup':>8} "
              f"{'roof ms':>8} {'% roof':>7} {'GB/s':>7} {'TFLOP/s':>8}")
    print(header)
    print("-" * len(header))
    for case in elementwise_cases(args.quick) + rotary_store_cases(args.quick) + attention_cases(args.quick):
        if args.only not in case.kernel:
            continue
        t_triton = time_ms(case.triton_fn)
        t_graph = graph_time_ms(case.triton_fn)
        t_torch = time_ms(case.torch_fn)
        roof = max(case.bytes_moved / (args.bw_gbps * 1e9), case.flops / (args.tflops * 1e12)) * 1e3
        gbps = case.bytes_moved / (t_graph * 1e-3) / 1e9
        tflops = case.flops / (t_graph * 1e-3) / 1e12
        print(f"{case.kernel:<18} {case.shape:<30} {t_torch:>9.4f} {t_triton:>9.4f} {t_graph:>9.4f} "
              f"{t_torch / t_triton:>7.2f}x {roof:>8.4f} {100 * roof / t_graph:>6.1f}% {gbps:>7.0f} "
              f"{tflops:>8.1f}")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
