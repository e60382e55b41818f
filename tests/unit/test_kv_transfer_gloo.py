"""Two real processes on 127.0.0.1: one request's KV via ChannelListener/connect_channel (gloo; NCCL too with
two GPUs); a layout mismatch failing clearly on both sides of the handshake."""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable

import pytest
import torch

from contracts.kv_cache_spec import KVCacheSpec
from contracts.transfer import TransferTarget
from kv_transfer.dist_channel import ChannelListener, connect_channel
from kv_transfer.layout import KVLayout, KVLayoutMismatch
from kv_transfer.receiver import KVReceiveEndpoint, KVReceiver
from kv_transfer.sender import KVSender
from kv_transfer.state import TransferState

pytestmark = pytest.mark.timeout(90)

LAYOUT = KVLayout(KVCacheSpec(block_size=16, num_kv_heads=3, head_dim=64, dtype="float32"), num_layers=4)
NUM_BLOCKS = 12
TARGET = TransferTarget("req-1", "decode-0", (10, 3, 6, 11), num_tokens=50)  # 4 blocks
SRC_BLOCKS = [2, 7, 0, 5]


def _source_caches() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(1234)
    shape = (NUM_BLOCKS, *LAYOUT.block_shape)
    return (
        [torch.randn(shape, generator=gen) for _ in range(LAYOUT.num_layers)],
        [torch.randn(shape, generator=gen) for _ in range(LAYOUT.num_layers)],
    )


def _prefill_main(port: int, layout: KVLayout, go, results, device: str = "cpu") -> None:
    """Child process: connect as 'prefill-0', stream one request's KV, report the sender's outcome."""
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    try:
        channel = connect_channel("127.0.0.1", port, "prefill-0", layout, device=device, timeout=30)
    except KVLayoutMismatch as e:
        results.put(("mismatch", str(e)))
        return
    if not go.wait(30):
        results.put(("error", "decode side never registered the receiver"))
        return
    src_k, src_v = _source_caches()
    sender = KVSender(TARGET, layout, channel, lease_seconds=30)
    for layer in range(layout.num_layers):
        sender.send_layer(layer, src_k[layer].to(device), src_v[layer].to(device), SRC_BLOCKS)
    sender.send_final(4242, torch.arange(6, dtype=torch.float32, device=device).view(1, 6))
    deadline = time.monotonic() + 30
    while sender.poll() not in (TransferState.DONE, TransferState.FAILED) and time.monotonic() < deadline:
        time.sleep(0.005)
    results.put((sender.state.value, sender.bytes_sent))
    channel.close()


def _start_prefill(port: int, layout: KVLayout, device: str = "cpu"):
    ctx = mp.get_context("spawn")
    go, results = ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_prefill_main, args=(port, layout, go, results, device), daemon=True)
    proc.start()
    return proc, go, results


def _finish(proc) -> None:
    proc.join(15)
    if proc.is_alive():
        proc.kill()
        proc.join(5)


_TWO_GPUS = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="NCCL channel needs two CUDA devices",
)


@pytest.mark.parametrize(
    "decode_device, prefill_device",
    [("cpu", "cpu"), pytest.param("cuda:0", "cuda:1", marks=[pytest.mark.gpu, _TWO_GPUS], id="nccl")],
)
def test_kv_of_one_request_moves_between_two_processes(decode_device, prefill_device):
    listener = ChannelListener("127.0.0.1", 0, device=decode_device)
    host, port = listener.address
    assert (host, port != 0) == ("127.0.0.1", True)
    proc, go, results = _start_prefill(port, LAYOUT, prefill_device)
    try:
        channel = listener.accept("prefill-0", LAYOUT, timeout=30)
        shape = (NUM_BLOCKS, *LAYOUT.block_shape)
        dst_k = [torch.zeros(shape, device=decode_device) for _ in range(LAYOUT.num_layers)]
        dst_v = [torch.zeros(shape, device=decode_device) for _ in range(LAYOUT.num_layers)]
        endpoint = KVReceiveEndpoint(channel, LAYOUT, dst_k, dst_v)
        endpoint.start()
        receiver = KVReceiver(TARGET, LAYOUT, lease_seconds=30)
        endpoint.register(receiver)
        go.set()
        deadline = time.monotonic() + 30
        while (
            receiver.poll() not in (TransferState.DONE, TransferState.FAILED) and time.monotonic() < deadline
        ):
            time.sleep(0.005)
        assert receiver.state is TransferState.DONE, receiver.failure_detail
        sender_state, bytes_sent = results.get(timeout=30)
        assert sender_state == "done"
        assert bytes_sent == receiver.bytes_received
        src_k, src_v = _source_caches()
        for layer in range(LAYOUT.num_layers):
            assert torch.equal(dst_k[layer][list(TARGET.block_ids)].cpu(), src_k[layer][SRC_BLOCKS])
            assert torch.equal(dst_v[layer][list(TARGET.block_ids)].cpu(), src_v[layer][SRC_BLOCKS])
        assert receiver.first_token_id == 4242
        assert receiver.draft_features.cpu().tolist() == [[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]]
        endpoint.stop(timeout=5)
    finally:
        _finish(proc)
        listener.close()


def handshake_mismatch(start: Callable[[int], tuple], decode_layout: KVLayout) -> list[str]:
    """Both sides' error messages when the prefill process `start(port)` launches offers a layout that
    `decode_layout` refuses: the decode side's KVLayoutMismatch and what the prefill side reported."""
    listener = ChannelListener("127.0.0.1", 0)
    proc, _, results = start(listener.address[1])
    try:
        with pytest.raises(KVLayoutMismatch) as info:
            listener.accept("prefill-0", decode_layout, timeout=30)
        kind, prefill_message = results.get(timeout=30)
        assert kind == "mismatch"
        return [str(info.value), prefill_message]
    finally:
        _finish(proc)
        listener.close()


def test_layout_mismatch_fails_the_handshake_on_both_sides():
    wrong = KVLayout(KVCacheSpec(block_size=32, num_kv_heads=3, head_dim=64, dtype="bfloat16"), num_layers=4)
    for message in handshake_mismatch(lambda port: _start_prefill(port, wrong), LAYOUT):
        assert "block_size decode=16 prefill=32" in message
        assert "dtype decode='float32' prefill='bfloat16'" in message
        assert "prefill-0" in message


def test_a_kv_head_shard_on_the_wire_fails_the_handshake_naming_the_head_mapping():
    # KV travels as whole heads whatever the TP sizes; a side offering one rank's shard (2 of 3 kv heads,
    # rank 0 of 2) maps heads differently and is refused on both sides.
    shard = KVLayout(KVCacheSpec(block_size=16, num_kv_heads=2, head_dim=64, dtype="float32"), num_layers=4,
                     tp_rank=0, tp_size=2)
    for message in handshake_mismatch(lambda port: _start_prefill(port, shard), LAYOUT):
        assert "num_kv_heads decode=3 prefill=2" in message
        assert "tp_size decode=1 prefill=2" in message
