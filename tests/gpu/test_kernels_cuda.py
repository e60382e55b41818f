"""Compiled Triton kernels equal the torch references at Llama-3-8B shapes, graph-safe (no host sync)."""
from __future__ import annotations

import os
import random

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from bench.kernels.kernels_gpu import paged_batch
from kernels.activation.kernel import silu_mul_triton
from kernels.activation.reference import silu_mul_ref
from kernels.attention.kernel import (
    paged_attention_triton,
    paged_decode_attention,
    paged_prefill_attention,
)
from kernels.attention.metadata import AttentionMetadata, SeqSpan
from kernels.attention.reference import paged_attention_ref
from kernels.linear.kernel import linear_triton
from kernels.rmsnorm.kernel import rms_norm_triton
from kernels.rmsnorm.reference import rms_norm_ref
from kernels.rotary.kernel import apply_rotary_triton, rotary_store_kv_triton
from kernels.rotary.reference import apply_rotary_ref, rotary_store_kv_ref
from kernels.store_kv.kernel import store_kv_triton
from kernels.store_kv.reference import store_kv_ref

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]

HEADS, KV_HEADS, HEAD_DIM, HIDDEN, BLOCK = 32, 8, 128, 4096, 16
DEV = torch.device("cuda")
BF16 = torch.bfloat16


@pytest.fixture(autouse=True)
def compiled_kernels_only() -> None:
    # tests/kernels switches the process to the interpreter (TRITON_INTERPRET=1) and re-decorates the kernels.
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter mode is on in this process: run tests/gpu in its own pytest process")


def fp32_reference(q, k_cache, v_cache, meta) -> torch.Tensor:
    return paged_attention_ref(q.float(), k_cache.float(), v_cache.float(), meta, HEAD_DIM ** -0.5)


def assert_attention_close(got: torch.Tensor, q, k_cache, v_cache, meta) -> None:
    # bf16 inputs, fp32 accumulation: compare against an fp32 reference with bf16-level tolerance.
    torch.testing.assert_close(got.float(), fp32_reference(q, k_cache, v_cache, meta), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("batch", [1, 8, 64])
@pytest.mark.parametrize("context", [512, 4096])
def test_decode_matches_reference_at_llama3_8b_shapes(batch: int, context: int) -> None:
    rng = random.Random(batch * context)
    # Ragged contexts ending on and off block boundaries, up to `context`.
    seqs = [(context - 1 if i == 0 else rng.randint(context // 2, context - 1), 1) for i in range(batch)]
    q, k_cache, v_cache, meta = paged_batch(seqs, seed=batch + context)
    assert_attention_close(paged_attention_triton(q, k_cache, v_cache, meta, HEAD_DIM ** -0.5),
                           q, k_cache, v_cache, meta)


@pytest.mark.parametrize("num_splits", [1, 4, 16])
def test_decode_split_k_on_and_off_agree_with_reference(num_splits: int) -> None:
    q, k_cache, v_cache, meta = paged_batch([(4095, 1), (17, 1)], seed=num_splits)
    got = paged_decode_attention(q, k_cache, v_cache, meta, HEAD_DIM ** -0.5, num_splits=num_splits)
    assert_attention_close(got, q, k_cache, v_cache, meta)


@pytest.mark.parametrize("seqs", [
    [(0, 512)],
    [(0, 4096)],
    [(3584, 512), (0, 300), (1024, 33)],
    [(4000, 1)] * 8 + [(0, 300), (512, 512)],  # split-fused: decodes beside prefill chunks
])
def test_prefill_and_mixed_batches_match_reference(seqs: list[tuple[int, int]]) -> None:
    q, k_cache, v_cache, meta = paged_batch(seqs, seed=len(seqs))
    got = paged_attention_triton(q, k_cache, v_cache, meta, HEAD_DIM ** -0.5)
    assert_attention_close(got, q, k_cache, v_cache, meta)


@pytest.mark.parametrize("tokens", [1, 64, 4096])
def test_store_kv_is_bit_exact(tokens: int) -> None:
    gen = torch.Generator(device=DEV).manual_seed(tokens)
    num_blocks = tokens // BLOCK + 8
    slots = torch.randperm(num_blocks * BLOCK, generator=gen, device=DEV)[:tokens]
    k = torch.randn(tokens, KV_HEADS, HEAD_DIM, generator=gen, device=DEV, dtype=BF16)
    v = torch.randn(tokens, KV_HEADS, HEAD_DIM, generator=gen, device=DEV, dtype=BF16)
    caches = [torch.zeros(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, device=DEV, dtype=BF16) for _ in range(4)]
    store_kv_triton(k, v, caches[0], caches[1], slots)
    store_kv_ref(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


@pytest.mark.parametrize("rows", [1, 64, 4096])
def test_rms_norm_with_and_without_residual_matches_reference(rows: int) -> None:
    gen = torch.Generator(device=DEV).manual_seed(rows)
    x = torch.randn(rows, HIDDEN, generator=gen, device=DEV, dtype=BF16)
    residual = torch.randn(rows, HIDDEN, generator=gen, device=DEV, dtype=BF16)
    weight = torch.randn(HIDDEN, generator=gen, device=DEV, dtype=BF16)
    torch.testing.assert_close(rms_norm_triton(x, weight, 1e-5), rms_norm_ref(x, weight, 1e-5))
    out, new_residual = rms_norm_triton(x, weight, 1e-5, residual)
    ref_out, ref_residual = rms_norm_ref(x, weight, 1e-5, residual)
    torch.testing.assert_close(out, ref_out)
    assert torch.equal(new_residual, ref_residual)


@pytest.mark.parametrize("tokens", [1, 64, 4096])
def test_rotary_matches_reference(tokens: int) -> None:
    gen = torch.Generator(device=DEV).manual_seed(tokens)
    fused = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=gen, device=DEV, dtype=BF16)
    q = fused[:, :HEADS * HEAD_DIM].view(tokens, HEADS, HEAD_DIM)
    k = fused[:, HEADS * HEAD_DIM:(HEADS + KV_HEADS) * HEAD_DIM].view(tokens, KV_HEADS, HEAD_DIM)
    angles = torch.rand(tokens, HEAD_DIM // 2, generator=gen, device=DEV) * 4096
    cos, sin = angles.cos().to(BF16), angles.sin().to(BF16)
    # One rounding (kernel) vs one per product (reference): near cancellation the gap is a product ulp.
    for got, ref in zip(apply_rotary_triton(q, k, cos, sin), apply_rotary_ref(q, k, cos, sin), strict=True):
        torch.testing.assert_close(got, ref, atol=4e-2, rtol=8e-3)


@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336), (128256, 4096)])
def test_skinny_linear_matches_cublas_at_llama3_8b_shapes(rows: int, n: int, k: int) -> None:
    gen = torch.Generator(device=DEV).manual_seed(rows + n)
    x = torch.randn(rows, k, generator=gen, device=DEV, dtype=BF16)
    weight = torch.randn(n, k, generator=gen, device=DEV, dtype=BF16) * 0.02
    # Both accumulate in fp32 and round once; only the summation order differs.
    torch.testing.assert_close(linear_triton(x, weight).float(), F.linear(x.float(), weight.float()),
                               atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("tokens", [1, 64])
def test_silu_mul_matches_reference(tokens: int) -> None:
    gen = torch.Generator(device=DEV).manual_seed(tokens)
    gate_up = torch.randn(tokens, 2 * 14336, generator=gen, device=DEV, dtype=BF16) * 3
    torch.testing.assert_close(silu_mul_triton(gate_up), silu_mul_ref(gate_up))


@pytest.mark.parametrize("tokens", [1, 64])
def test_fused_rotary_store_kv_matches_reference(tokens: int) -> None:
    gen = torch.Generator(device=DEV).manual_seed(tokens)
    heads = torch.randn(tokens, HEADS + 2 * KV_HEADS, HEAD_DIM, generator=gen, device=DEV, dtype=BF16)
    q, k, v = heads.split_with_sizes([HEADS, KV_HEADS, KV_HEADS], dim=1)
    angles = torch.rand(tokens, HEAD_DIM // 2, generator=gen, device=DEV) * 4096
    cos, sin = angles.cos().to(BF16), angles.sin().to(BF16)
    num_blocks = tokens // BLOCK + 4
    slots = torch.randperm(num_blocks * BLOCK, generator=gen, device=DEV)[:tokens]
    caches = [torch.zeros(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, device=DEV, dtype=BF16) for _ in range(4)]
    q_got = rotary_store_kv_triton(q, k, v, cos, sin, caches[0], caches[1], slots)
    q_ref = rotary_store_kv_ref(q, k, v, cos, sin, caches[2], caches[3], slots)
    torch.testing.assert_close(q_got, q_ref, atol=4e-2, rtol=8e-3)
    torch.testing.assert_close(caches[0], caches[2], atol=4e-2, rtol=8e-3)
    assert torch.equal(caches[1], caches[3])


def decode_step(x, residual, norm_w, q, k, v, cos, sin, k_cache, v_cache, meta):
    """One decode layer's kernel chain as the model calls it: norm → rotary → store → attention."""
    h, res = rms_norm_triton(x, norm_w, 1e-5, residual)
    q, k = apply_rotary_triton(q, k, cos, sin)
    store_kv_triton(k, v, k_cache, v_cache, meta.slot_mapping)
    return h, res, paged_attention_triton(q, k_cache, v_cache, meta, HEAD_DIM ** -0.5)


def test_decode_chain_needs_no_host_sync_and_replays_in_a_cuda_graph() -> None:
    batch = 8
    # Every context is 9 mod 16 long, so the next token still fits the sequence's last block.
    q, k_cache, v_cache, meta = paged_batch([(1000 + 96 * i, 1) for i in range(batch)], seed=99)
    gen = torch.Generator(device=DEV).manual_seed(5)
    static = {
        "x": torch.randn(batch, HIDDEN, generator=gen, device=DEV, dtype=BF16),
        "residual": torch.randn(batch, HIDDEN, generator=gen, device=DEV, dtype=BF16),
        "q": q, "k": torch.randn(batch, KV_HEADS, HEAD_DIM, generator=gen, device=DEV, dtype=BF16),
        "v": torch.randn(batch, KV_HEADS, HEAD_DIM, generator=gen, device=DEV, dtype=BF16),
        "cos": torch.rand(batch, HEAD_DIM // 2, generator=gen, device=DEV, dtype=BF16),
        "sin": torch.rand(batch, HEAD_DIM // 2, generator=gen, device=DEV, dtype=BF16),
    }
    norm_w = torch.randn(HIDDEN, generator=gen, device=DEV, dtype=BF16)

    def args() -> tuple:
        return (static["x"], static["residual"], norm_w, static["q"], static["k"], static["v"],
                static["cos"], static["sin"], k_cache, v_cache, meta)

    # Warm-up compiles every kernel outside the capture; then sync debug mode makes any host sync an error.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        decode_step(*args())
        torch.cuda.set_sync_debug_mode("error")
        try:
            decode_step(*args())
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = decode_step(*args())

    # Next step: new inputs, every sequence one token longer, new slots, all written into captured tensors.
    for tensor in static.values():
        tensor.copy_(torch.randn(tensor.shape, generator=gen, device=DEV).to(BF16))
    new_spans, new_slots = [], []
    for span in meta.spans:
        pos = span.seq_len
        new_slots.append(span.block_ids[pos // BLOCK] * BLOCK + pos % BLOCK)
        new_spans.append(SeqSpan(span.query_start, 1, span.seq_len + 1, span.block_ids, None))
    meta.seq_lens.add_(1)
    meta.slot_mapping.copy_(torch.tensor(new_slots, device=DEV))
    ref_k_cache, ref_v_cache = k_cache.clone(), v_cache.clone()
    graph.replay()
    torch.cuda.synchronize()

    ref_meta = AttentionMetadata.from_spans(new_spans, new_slots, BLOCK, device=DEV)
    h, res = rms_norm_ref(static["x"], norm_w, 1e-5, static["residual"])
    rq, rk = apply_rotary_ref(static["q"], static["k"], static["cos"], static["sin"])
    store_kv_ref(rk, static["v"], ref_k_cache, ref_v_cache, ref_meta.slot_mapping)
    torch.testing.assert_close(outputs[0], h)
    assert torch.equal(outputs[1], res)
    assert torch.equal(v_cache, ref_v_cache)  # v is stored as given: bit-exact, and only at the new slots
    torch.testing.assert_close(k_cache, ref_k_cache, atol=4e-2, rtol=8e-3)  # k went through rotary
    torch.testing.assert_close(outputs[2].float(), fp32_reference(rq, ref_k_cache, ref_v_cache, ref_meta),
                               atol=2e-2, rtol=2e-2)


def test_prefill_kernel_serves_decode_rows_like_the_decode_kernel() -> None:
    q, k_cache, v_cache, meta = paged_batch([(777, 1), (2048, 1), (15, 1)], seed=3)
    decode = paged_decode_attention(q, k_cache, v_cache, meta, HEAD_DIM ** -0.5)
    prefill = paged_prefill_attention(q, k_cache, v_cache, meta, HEAD_DIM ** -0.5)
    torch.testing.assert_close(decode, prefill, atol=1e-2, rtol=1e-2)


def test_pdl_chain_replayed_back_to_back_equals_the_chain_run_one_kernel_at_a_time() -> None:
    # Every kernel here is launched with programmatic dependent launch on Hopper (kernels/pdl.py). Run
    # one at a time (a sync after each) no kernel can overlap its predecessor; replayed from a graph they do.
    # Same kernels, same math: the results must be bit-identical.
    from kernels.linear.kernel import silu_mul_linear_triton
    from tests.gpu.pdl_replay import stepped_and_replayed

    gen = torch.Generator(device=DEV).manual_seed(11)
    layers = 6
    w_up = [torch.randn(4096, HIDDEN, generator=gen, device=DEV, dtype=BF16) * 0.02 for _ in range(layers)]
    w_down = [torch.randn(HIDDEN, 2048, generator=gen, device=DEV, dtype=BF16) * 0.02 for _ in range(layers)]
    norm_w = torch.randn(HIDDEN, generator=gen, device=DEV, dtype=BF16)
    x = torch.randn(1, HIDDEN, generator=gen, device=DEV, dtype=BF16)

    def chain(sync: bool):
        h, res = x, torch.zeros_like(x)
        for up, down in zip(w_up, w_down, strict=True):
            h, res = rms_norm_triton(h, norm_w, 1e-5, res)
            if sync:
                torch.cuda.synchronize()
            h = linear_triton(h, up)
            if sync:
                torch.cuda.synchronize()
            h = silu_mul_linear_triton(h, down)
            if sync:
                torch.cuda.synchronize()
        return h, res

    expected, got = stepped_and_replayed(chain, DEV)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_two_pass_argmax_equals_argmax_on_a_llama3_vocabulary() -> None:
    from engine.sampler import argmax_rows

    gen = torch.Generator(device=DEV).manual_seed(2)
    logits = torch.randint(0, 50, (4, 128256), generator=gen, device=DEV).float()  # ties everywhere
    assert torch.equal(argmax_rows(logits), logits.argmax(dim=-1))


@pytest.mark.parametrize("context", [63, 64, 65, 511, 512, 4095])
def test_bs1_decode_after_the_fused_kv_store_sees_the_newest_key_under_pdl(context: int) -> None:
    # bs1: both kernels launch with PDL and attention streams its older KV before waiting for the store.
    # The newest position (written by the store just before) must still be what attention reads.
    from kernels.rotary.kernel import rotary_store_kv_triton

    q, k_cache, v_cache, meta = paged_batch([(context, 1)], seed=context)
    gen = torch.Generator(device=DEV).manual_seed(context)
    heads = torch.randn(1, HEADS + 2 * KV_HEADS, HEAD_DIM, generator=gen, device=DEV, dtype=BF16)
    qh, k, v = heads.split_with_sizes([HEADS, KV_HEADS, KV_HEADS], dim=1)
    angles = torch.rand(1, HEAD_DIM // 2, generator=gen, device=DEV) * 4096
    cos, sin = angles.cos().to(BF16), angles.sin().to(BF16)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()

    def step() -> torch.Tensor:
        rq = rotary_store_kv_triton(qh, k, v, cos, sin, k_cache, v_cache, meta.slot_mapping)
        return paged_attention_triton(rq, k_cache, v_cache, meta, HEAD_DIM ** -0.5)

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = step()
    graph.replay()
    torch.cuda.synchronize()
    from kernels.rotary.reference import rotary_store_kv_ref

    rq = rotary_store_kv_ref(qh, k, v, cos, sin, ref_k, ref_v, meta.slot_mapping)
    assert_attention_close(got, rq, ref_k, ref_v, meta)


@pytest.mark.parametrize("n", [6144, 28672])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_fused_into_the_gemv_matches_norm_then_linear(n: int, with_residual: bool) -> None:
    from kernels.norm_linear.kernel import norm_linear_supported, rms_norm_linear_triton
    from kernels.norm_linear.reference import rms_norm_linear_ref

    gen = torch.Generator(device=DEV).manual_seed(n)
    x = torch.randn(1, HIDDEN, generator=gen, device=DEV, dtype=BF16)
    residual = torch.randn(1, HIDDEN, generator=gen, device=DEV, dtype=BF16) if with_residual else None
    norm_weight = torch.randn(HIDDEN, generator=gen, device=DEV, dtype=BF16)
    weight = torch.randn(n, HIDDEN, generator=gen, device=DEV, dtype=BF16) * 0.02
    assert norm_linear_supported(x, norm_weight, weight, residual)
    got, got_res = rms_norm_linear_triton(x, residual, norm_weight, 1e-5, weight)
    ref, ref_res = rms_norm_linear_ref(x, residual, norm_weight, 1e-5, weight)
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)
    assert torch.equal(got_res, ref_res)


@pytest.mark.parametrize(("with_residual", "tokens"), [(False, 1), (True, 1), (True, 2), (False, 16)])
def test_norm_qkv_rotary_store_matches_the_reference_at_llama3_8b_shapes(with_residual: bool,
                                                                         tokens: int) -> None:
    """One row: norm + qkv + rotary + store in one kernel; 2-16 rows: the qkv GEMM, rotary in its epilogue."""
    from kernels.norm_qkv_rope.kernel import rms_norm_qkv_rotary_store_triton
    from kernels.norm_qkv_rope.reference import rms_norm_qkv_rotary_store_ref

    gen = torch.Generator(device=DEV).manual_seed(7 + with_residual + tokens)
    x = torch.randn(tokens, HIDDEN, generator=gen, device=DEV, dtype=BF16)
    residual = torch.randn(tokens, HIDDEN, generator=gen, device=DEV, dtype=BF16) if with_residual else None
    norm_weight = torch.randn(HIDDEN, generator=gen, device=DEV, dtype=BF16)
    rows = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    weight = torch.randn(rows, HIDDEN, generator=gen, device=DEV, dtype=BF16) * 0.02
    angles = torch.rand(tokens, HEAD_DIM // 2, generator=gen, device=DEV) * 4096
    cos, sin = angles.cos().to(BF16), angles.sin().to(BF16)
    caches = [torch.zeros(4, BLOCK, KV_HEADS, HEAD_DIM, device=DEV, dtype=BF16) for _ in range(4)]
    slots = torch.randperm(4 * BLOCK, generator=gen, device=DEV)[:tokens]
    q, res = rms_norm_qkv_rotary_store_triton(x, residual, norm_weight, 1e-5, weight, cos, sin, caches[0],
                                              caches[1], slots, HEADS)
    ref_q, ref_res = rms_norm_qkv_rotary_store_ref(x, residual, norm_weight, 1e-5, weight, cos, sin,
                                                   caches[2], caches[3], slots, HEADS)
    # Summation order (GEMV) and one rounding vs one per product (rotary): bf16-level tolerance.
    torch.testing.assert_close(q.float(), ref_q.float(), atol=5e-2, rtol=3e-2)
    torch.testing.assert_close(caches[0].float(), caches[2].float(), atol=5e-2, rtol=3e-2)
    torch.testing.assert_close(caches[1].float(), caches[3].float(), atol=5e-2, rtol=3e-2)
    assert torch.equal(res, ref_res)


@pytest.mark.parametrize("tokens", [1, 2, 16])
def test_rms_norm_mlp_matches_the_reference_at_llama3_8b_shapes(tokens: int) -> None:
    """1 row: norm GEMV + SiLU-prologue GEMV; 2-16 rows: norm, gated GEMM (SiLU epilogue), down GEMM."""
    from kernels.norm_mlp.kernel import rms_norm_mlp_triton
    from kernels.norm_mlp.reference import rms_norm_mlp_ref

    inter = 14336
    gen = torch.Generator(device=DEV).manual_seed(21 + tokens)
    x = torch.randn(tokens, HIDDEN, generator=gen, device=DEV, dtype=BF16)
    residual = torch.randn(tokens, HIDDEN, generator=gen, device=DEV, dtype=BF16)
    norm_weight = torch.randn(HIDDEN, generator=gen, device=DEV, dtype=BF16)
    gate_up = torch.randn(2 * inter, HIDDEN, generator=gen, device=DEV, dtype=BF16) * 0.02
    down = torch.randn(HIDDEN, inter, generator=gen, device=DEV, dtype=BF16) * 0.01
    got, got_res = rms_norm_mlp_triton(x, residual, norm_weight, 1e-5, gate_up, down)
    ref, ref_res = rms_norm_mlp_ref(x, residual, norm_weight, 1e-5, gate_up, down)
    torch.testing.assert_close(got.float(), ref.float(), atol=3e-2, rtol=3e-2)
    assert torch.equal(got_res, ref_res)
