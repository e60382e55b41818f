"""int8 / int4 KV caches travel as stored: codes, scales and zeros land bit-exact (loopback and two gloo
processes), the checksum covers the scales, and a decode side with another cache dtype fails the handshake."""

from __future__ import annotations

import time

import pytest
import torch
import torch.multiprocessing as mp

from contracts.kv_cache_spec import KVCacheSpec, scales_for
from contracts.transfer import TransferTarget
from engine.kv_cache import KVCache
from kernels.store_kv.reference import store_kv_ref
from kv_transfer.channel import LoopbackChannel
from kv_transfer.dist_channel import ChannelListener, connect_channel
from kv_transfer.layout import KVLayout, KVLayoutMismatch
from kv_transfer.receiver import KVReceiveEndpoint, KVReceiver
from kv_transfer.sender import KVSender
from kv_transfer.state import TransferState
from tests.unit.test_kv_sender_receiver import CorruptingChannel
from tests.unit.test_kv_transfer_gloo import handshake_mismatch

pytestmark = pytest.mark.timeout(90)

NUM_LAYERS, NUM_BLOCKS, BLOCK, KV_HEADS, HEAD_DIM = 3, 10, 4, 2, 64
TARGET = TransferTarget("req-q", "decode-0", (8, 1, 5), num_tokens=10)  # 3 blocks
SRC_BLOCKS = [2, 7, 0]


def layout_of(dtype: str) -> KVLayout:
    return KVLayout(KVCacheSpec(BLOCK, KV_HEADS, HEAD_DIM, dtype, scales_for(dtype, HEAD_DIM)), NUM_LAYERS)


def source_cache(dtype: str) -> KVCache:
    """Every slot written through the torch store from seeded random rows (the same in every process)."""
    kv = KVCache(layout_of(dtype).spec, NUM_LAYERS, NUM_BLOCKS)
    gen = torch.Generator().manual_seed(99)
    slots = torch.arange(NUM_BLOCKS * BLOCK)
    for layer in range(NUM_LAYERS):
        k, v = (torch.randn(len(slots), KV_HEADS, HEAD_DIM, generator=gen) for _ in range(2))
        store_kv_ref(k, v, *kv.layer(layer), slots)
    return kv


def stored(kv: KVCache, layer: int, blocks: list[int]) -> list[torch.Tensor]:
    return [t[blocks] for t in (kv.k[layer], kv.v[layer], *kv.layer_scales(layer))]


def endpoint_for(channel, dst: KVCache) -> KVReceiveEndpoint:
    layout = KVLayout(dst.spec, dst.num_layers)
    scales = [dst.layer_scales(i) for i in range(dst.num_layers)]
    return KVReceiveEndpoint(channel, layout, dst.k, dst.v, scales)


def send_all(sender: KVSender, src: KVCache) -> None:
    for layer in range(NUM_LAYERS):
        sender.send_layer(layer, src.k[layer], src.v[layer], SRC_BLOCKS, src.layer_scales(layer))
    sender.send_final(7)


def wait_done(receiver: KVReceiver) -> None:
    deadline = time.monotonic() + 30
    while receiver.poll() not in (TransferState.DONE, TransferState.FAILED) and time.monotonic() < deadline:
        time.sleep(0.005)


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_quantized_blocks_and_their_scales_land_bit_exact_over_loopback(dtype: str) -> None:
    prefill_end, decode_end = LoopbackChannel.pair()
    src, dst = source_cache(dtype), KVCache(layout_of(dtype).spec, NUM_LAYERS, NUM_BLOCKS)
    endpoint = endpoint_for(decode_end, dst)
    endpoint.start()
    try:
        receiver = KVReceiver(TARGET, layout_of(dtype))
        endpoint.register(receiver)
        sender = KVSender(TARGET, layout_of(dtype), prefill_end)
        send_all(sender, src)
        wait_done(receiver)
        assert receiver.state is TransferState.DONE, receiver.failure_detail
        for layer in range(NUM_LAYERS):
            for got, want in zip(stored(dst, layer, list(TARGET.block_ids)), stored(src, layer, SRC_BLOCKS),
                                 strict=True):
                assert torch.equal(got, want)
        # What moved is what the layout says a token costs, in whole blocks (k, v, scales; frames 16-aligned).
        assert receiver.bytes_received >= NUM_LAYERS * 3 * BLOCK * layout_of(dtype).bytes_per_token()
    finally:
        endpoint.stop()
        prefill_end.close()


def test_a_flipped_bit_in_the_scales_fails_the_checksum() -> None:
    prefill_end, decode_end = LoopbackChannel.pair()
    src, dst = source_cache("int4"), KVCache(layout_of("int4").spec, NUM_LAYERS, NUM_BLOCKS)
    endpoint = endpoint_for(decode_end, dst)
    endpoint.start()
    try:
        receiver = KVReceiver(TARGET, layout_of("int4"))
        endpoint.register(receiver)

        class ScaleCorrupting(CorruptingChannel):
            def send(self, t: torch.Tensor):
                if t.dtype == torch.uint8 and t.numel() > 64:  # a layer payload: flip a byte of its scales
                    t = t.clone()
                    t[-8] ^= 0x10
                return self.inner.send(t)

        sender = KVSender(TARGET, layout_of("int4"), ScaleCorrupting(prefill_end, 0))
        sender.send_layer(0, src.k[0], src.v[0], SRC_BLOCKS, src.layer_scales(0))
        wait_done(receiver)
        assert receiver.state is TransferState.FAILED and "checksum" in receiver.failure_detail
    finally:
        endpoint.stop()
        prefill_end.close()


def _prefill_main(port: int, dtype: str, go, results) -> None:
    """Child process: connect with a `dtype` cache, stream the request, report the sender's outcome."""
    try:
        channel = connect_channel("127.0.0.1", port, "prefill-0", layout_of(dtype), timeout=30)
    except KVLayoutMismatch as e:
        results.put(("mismatch", str(e)))
        return
    sender = KVSender(TARGET, layout_of(dtype), channel, lease_seconds=30)
    if not go.wait(30):  # the decode side registers its receiver first
        results.put(("error", "no receiver registered"))
        return
    send_all(sender, source_cache(dtype))
    deadline = time.monotonic() + 30
    while sender.poll() not in (TransferState.DONE, TransferState.FAILED) and time.monotonic() < deadline:
        time.sleep(0.005)
    results.put((sender.state.value, sender.bytes_sent))
    channel.close()


def _start(port: int, dtype: str):
    ctx = mp.get_context("spawn")
    go, results = ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_prefill_main, args=(port, dtype, go, results), daemon=True)
    proc.start()
    return proc, go, results


def test_int4_blocks_and_scales_move_between_two_gloo_processes() -> None:
    listener = ChannelListener("127.0.0.1", 0)
    proc, go, results = _start(listener.address[1], "int4")
    try:
        dst = KVCache(layout_of("int4").spec, NUM_LAYERS, NUM_BLOCKS)
        endpoint = endpoint_for(listener.accept("prefill-0", layout_of("int4"), timeout=30), dst)
        endpoint.start()
        receiver = KVReceiver(TARGET, layout_of("int4"), lease_seconds=30)
        endpoint.register(receiver)
        go.set()
        wait_done(receiver)
        assert receiver.state is TransferState.DONE, receiver.failure_detail
        assert results.get(timeout=30) == ("done", receiver.bytes_received)
        src = source_cache("int4")
        for layer in range(NUM_LAYERS):
            for got, want in zip(stored(dst, layer, list(TARGET.block_ids)), stored(src, layer, SRC_BLOCKS),
                                 strict=True):
                assert torch.equal(got, want)
        endpoint.stop(timeout=5)
    finally:
        proc.join(15)
        listener.close()


def test_a_decode_side_with_another_cache_dtype_fails_the_handshake_naming_both() -> None:
    for message in handshake_mismatch(lambda port: _start(port, "int4"), layout_of("int8")):
        assert "dtype decode='int8' prefill='int4'" in message
        assert "scales.kind decode='per_token_head' prefill='grouped'" in message
