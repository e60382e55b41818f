"""int4 key offsets: every store path subtracts the same offset, attention over the shifted keys gives the
unshifted output, the offset cache travels bit-exact, and layouts with other offsets refuse each other."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from contracts.kv_cache_spec import KVCacheSpec, scales_for
from engine.kv_cache import KVCache, with_key_offsets
from kernels.attention.metadata import AttentionMetadata, SeqSpan
from kernels.attention.reference import paged_attention_ref
from kernels.rotary.reference import apply_rotary_ref
from kernels.store_kv.quant import QuantizedKV
from kernels.store_kv.reference import store_kv_ref
from kv_transfer.channel import LoopbackChannel
from kv_transfer.layout import KVLayout, KVLayoutMismatch
from kv_transfer.receiver import KVReceiver
from kv_transfer.sender import KVSender
from kv_transfer.state import TransferState
from tests.kernels.store_kv.test_store_kv_paths import (
    BLOCK,
    BLOCKS,
    HEAD_DIM,
    HEADS,
    KV_HEADS,
    SLOTS,
    exact_inputs,
    split_heads,
    stored,
    written_quantized_by_every_path,
)
from tests.unit import test_kv_transfer_quantized as transfer

pytestmark = pytest.mark.timeout(120)


def exact_offsets(layers: int, heads: int, dim: int, seed: int) -> torch.Tensor:
    """Offsets of 0, ±1/2, ±1: subtracting them from the exact inputs' keys is exact in fp32."""
    table = torch.tensor([0.0, 0.5, -0.5, 1.0, -1.0])
    return table[torch.randint(0, 5, (layers, heads, dim), generator=torch.Generator().manual_seed(seed))]


def int4_cache(offsets: torch.Tensor | None, layers: int = 1, heads: int = KV_HEADS, dim: int = HEAD_DIM,
               blocks: int = BLOCKS) -> KVCache:
    spec = KVCacheSpec(BLOCK, heads, dim, "int4", scales_for("int4", dim))
    return KVCache(with_key_offsets(spec, offsets), layers, blocks, key_offsets=offsets)


def test_every_int4_path_stores_the_keys_minus_the_offset() -> None:
    offsets = exact_offsets(1, KV_HEADS, HEAD_DIM, seed=3)
    x, norm_weight, weight, cos, sin = exact_inputs()
    q, k, v = split_heads(F.linear(x * norm_weight, weight))
    _, k_rotated = apply_rotary_ref(q, k, cos, sin)
    # What an offset means: the bytes a cache without offsets stores for the keys minus the offset.
    shifted = int4_cache(None)
    store_kv_ref(k_rotated - offsets[0], v, *shifted.layer(0), SLOTS)
    expected = stored(shifted)
    unshifted = int4_cache(None)
    store_kv_ref(k_rotated, v, *unshifted.layer(0), SLOTS)
    assert not torch.equal(stored(unshifted)[0], expected[0])  # the offset changes the key bytes
    caches = written_quantized_by_every_path(lambda: int4_cache(offsets))
    for name, kv in caches.items():
        for got, want in zip(stored(kv), expected, strict=True):
            assert torch.equal(got, want), f"{name} wrote other bytes"


def attend(k_cache, v_cache, q: torch.Tensor, tokens: int) -> torch.Tensor:
    blocks = tuple(range(-(-tokens // BLOCK)))
    meta = AttentionMetadata.from_spans([SeqSpan(0, tokens, tokens, blocks, 0)], list(range(tokens)), BLOCK)
    return paged_attention_ref(q, k_cache, v_cache, meta, HEAD_DIM ** -0.5)


def test_attention_over_offset_keys_equals_attention_over_the_keys() -> None:
    tokens, dim = 24, 64
    gen = torch.Generator().manual_seed(11)
    # Keys with a large shared mean per head (what post-rotary keys have): the offset takes it out.
    mean = 4 * torch.randn(1, KV_HEADS, dim, generator=gen)
    k = torch.randn(tokens, KV_HEADS, dim, generator=gen) + mean
    v = torch.randn(tokens, KV_HEADS, dim, generator=gen)
    q = torch.randn(tokens, HEADS, dim, generator=gen)
    slots = torch.arange(tokens)
    float_caches = [[torch.zeros(tokens // BLOCK, BLOCK, KV_HEADS, dim) for _ in range(2)] for _ in range(2)]
    store_kv_ref(k, v, *float_caches[0], slots)
    store_kv_ref(k - mean[0], v, *float_caches[1], slots)
    exact = attend(*float_caches[0], q, tokens)
    # Softmax ignores q·mean, the same for every key of a query: the shifted float keys give the same output.
    torch.testing.assert_close(attend(*float_caches[1], q, tokens), exact, atol=1e-5, rtol=1e-5)
    offsets = mean.half().float()
    errors = []
    for key_offsets in (None, offsets):
        kv = int4_cache(key_offsets, heads=KV_HEADS, dim=dim, blocks=tokens // BLOCK)
        store_kv_ref(k, v, *kv.layer(0), slots)
        errors.append((attend(*kv.layer(0), q, tokens) - exact).abs().mean())
    # Read back as if the stored rows were the keys: the output stays within quantization of the exact
    # one, and closer than without the offset (the keys' range, hence their int4 step, shrinks).
    assert errors[1] < 0.1 and errors[1] < 0.7 * errors[0]


def test_an_offset_cache_lands_bit_exact_and_its_layout_names_the_offsets() -> None:
    dim = transfer.HEAD_DIM
    offsets = exact_offsets(transfer.NUM_LAYERS, transfer.KV_HEADS, dim, seed=5)

    def cache() -> KVCache:
        return int4_cache(offsets, transfer.NUM_LAYERS, transfer.KV_HEADS, dim, transfer.NUM_BLOCKS)

    src, dst = cache(), cache()
    gen = torch.Generator().manual_seed(99)
    slots = torch.arange(transfer.NUM_BLOCKS * BLOCK)
    for layer in range(transfer.NUM_LAYERS):
        k, v = (torch.randn(len(slots), transfer.KV_HEADS, dim, generator=gen) for _ in range(2))
        store_kv_ref(k, v, *src.layer(layer), slots)
    layout = KVLayout(src.spec, src.num_layers)
    assert layout.spec.key_offset_digest and KVLayout.from_bytes(layout.to_bytes()) == layout
    # Offsets are per layer and head, not per token: the bytes on the wire are int4's without them.
    assert layout.bytes_per_token() == transfer.layout_of("int4").bytes_per_token()
    prefill_end, decode_end = LoopbackChannel.pair()
    endpoint = transfer.endpoint_for(decode_end, dst)
    endpoint.start()
    try:
        receiver = KVReceiver(transfer.TARGET, layout)
        endpoint.register(receiver)
        transfer.send_all(KVSender(transfer.TARGET, layout, prefill_end), src)
        transfer.wait_done(receiver)
        assert receiver.state is TransferState.DONE, receiver.failure_detail
        for layer in range(transfer.NUM_LAYERS):
            for got, want in zip(transfer.stored(dst, layer, list(transfer.TARGET.block_ids)),
                                 transfer.stored(src, layer, transfer.SRC_BLOCKS), strict=True):
                assert torch.equal(got, want)
    finally:
        endpoint.stop()
        prefill_end.close()


def test_workers_with_other_key_offsets_refuse_each_other() -> None:
    mine = int4_cache(exact_offsets(1, KV_HEADS, HEAD_DIM, seed=1)).spec
    theirs = int4_cache(exact_offsets(1, KV_HEADS, HEAD_DIM, seed=2)).spec
    none = int4_cache(None).spec
    for other in (theirs, none):
        with pytest.raises(KVLayoutMismatch) as info:
            KVLayout(mine, 1).check_compatible(KVLayout(other, 1), names=("decode", "prefill"))
        message = str(info.value)
        assert (f"key_offset_digest decode={mine.key_offset_digest!r} "
                f"prefill={other.key_offset_digest!r}") in message


def test_offsets_must_match_the_spec_and_are_for_int4_keys_only() -> None:
    offsets = exact_offsets(1, KV_HEADS, HEAD_DIM, seed=1)
    spec = KVCacheSpec(BLOCK, KV_HEADS, HEAD_DIM, "int4", scales_for("int4", HEAD_DIM))
    with pytest.raises(ValueError, match="do not match the spec"):
        KVCache(spec, 1, BLOCKS, key_offsets=offsets)
    with pytest.raises(ValueError, match="int4 KV caches only"):
        dataclasses.replace(KVCacheSpec(BLOCK, KV_HEADS, HEAD_DIM, "int8", scales_for("int8", HEAD_DIM)),
                            key_offset_digest="00")
    int8 = KVCache(KVCacheSpec(BLOCK, KV_HEADS, HEAD_DIM, "int8", scales_for("int8", HEAD_DIM)), 1, BLOCKS)
    k_cache = int8.layer(0)[0]
    with pytest.raises(ValueError, match="int4 caches only"):
        QuantizedKV(k_cache.codes, k_cache.scale, offset=offsets[0])
    v_cache = int4_cache(offsets).layer(0)[1]
    assert isinstance(v_cache, QuantizedKV) and v_cache.offset is None  # values are never shifted
