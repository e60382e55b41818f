"""KVSender -> KVReceiveEndpoint -> KVReceiver over a loopback channel: data, failures, leases, aborts."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest
import torch

from contracts.kv_cache_spec import KVCacheSpec
from contracts.transfer import TransferTarget
from kv_transfer.channel import KVChannel, LoopbackChannel, TransferHandle
from kv_transfer.layout import KVLayout
from kv_transfer.receiver import KVReceiveEndpoint, KVReceiver
from kv_transfer.sender import KVSender
from kv_transfer.state import TransferState

pytestmark = pytest.mark.timeout(60)

LAYOUT = KVLayout(KVCacheSpec(block_size=4, num_kv_heads=2, head_dim=8, dtype="float32"), num_layers=4)
NUM_BLOCKS = 16


def _caches(seed: int | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    shape = (NUM_BLOCKS, *LAYOUT.block_shape)
    if seed is None:
        return (
            [torch.zeros(shape) for _ in range(LAYOUT.num_layers)],
            [torch.zeros(shape) for _ in range(LAYOUT.num_layers)],
        )
    gen = torch.Generator().manual_seed(seed)
    return (
        [torch.randn(shape, generator=gen) for _ in range(LAYOUT.num_layers)],
        [torch.randn(shape, generator=gen) for _ in range(LAYOUT.num_layers)],
    )


def _wait_for(pred, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


@dataclass
class Pair:
    """A prefill-side source cache and a decode-side destination cache joined by one endpoint."""

    channel: KVChannel
    endpoint: KVReceiveEndpoint
    src_k: list[torch.Tensor]
    src_v: list[torch.Tensor]
    dst_k: list[torch.Tensor]
    dst_v: list[torch.Tensor]
    finished: list[object] = field(default_factory=list)

    def request(
        self, rid: str, num_tokens: int, dst_ids: tuple[int, ...], lease: float = 10.0, register: bool = True
    ) -> tuple[KVSender, KVReceiver]:
        target = TransferTarget(rid, "decode-0", dst_ids, num_tokens)
        receiver = KVReceiver(target, LAYOUT, lease_seconds=lease, on_finish=self.finished.append)
        if register:
            self.endpoint.register(receiver)
        sender = KVSender(target, LAYOUT, self.channel, lease_seconds=lease, on_finish=self.finished.append)
        return sender, receiver

    def send_layer(self, sender: KVSender, layer: int, src_ids: list[int]) -> None:
        sender.send_layer(layer, self.src_k[layer], self.src_v[layer], src_ids)


@pytest.fixture
def pair():
    prefill_end, decode_end = LoopbackChannel.pair()
    dst_k, dst_v = _caches(None)
    endpoint = KVReceiveEndpoint(decode_end, LAYOUT, dst_k, dst_v)
    endpoint.start()
    src_k, src_v = _caches(seed=1)
    yield Pair(prefill_end, endpoint, src_k, src_v, dst_k, dst_v)
    endpoint.stop()
    prefill_end.close()


class CorruptingChannel(KVChannel):
    """Forwards to a real channel but flips one byte of the n-th payload-sized send (a faulty wire)."""

    def __init__(self, inner: KVChannel, corrupt_send: int) -> None:
        super().__init__()
        self.inner, self.corrupt_send, self.sends = inner, corrupt_send, 0

    def send(self, t: torch.Tensor) -> TransferHandle:
        self.sends += 1
        if self.sends == self.corrupt_send:
            t = t.clone()
            t.view(torch.uint8)[5] ^= 0x10
        return self.inner.send(t)

    def recv(self, t: torch.Tensor) -> TransferHandle:
        return self.inner.recv(t)

    def close(self) -> None:
        self.inner.close()


def test_interleaved_requests_land_in_their_reserved_blocks(pair):
    # three requests of one prefill batch: their frames interleave layer by layer on one channel
    plans = {
        "a": (9, [3, 7, 11], (0, 1, 2, 15)),  # 9 tokens -> 3 blocks; 4th reserved block is not sent
        "b": (4, [5], (4,)),
        "c": (13, [12, 0, 6, 2], (8, 9, 10, 11)),
    }
    features = torch.randn(1, 3 * 64)
    transfers = {rid: pair.request(rid, n, dst) for rid, (n, _, dst) in plans.items()}
    for layer in range(LAYOUT.num_layers):
        for rid, (_, src, _) in plans.items():
            pair.send_layer(transfers[rid][0], layer, src)
    for i, (sender, _) in enumerate(transfers.values()):
        sender.send_final(100 + i, features if i == 0 else None)
    _wait_for(lambda: all(r.poll() is TransferState.DONE for _, r in transfers.values()))
    assert all(s.poll() is TransferState.DONE for s, _ in transfers.values())
    written = set()
    for _, src, dst in plans.values():
        n = len(src)
        written |= set(dst[:n])
        for layer in range(LAYOUT.num_layers):
            assert torch.equal(pair.dst_k[layer][list(dst[:n])], pair.src_k[layer][src])
            assert torch.equal(pair.dst_v[layer][list(dst[:n])], pair.src_v[layer][src])
    untouched = [i for i in range(NUM_BLOCKS) if i not in written]
    assert not any(pair.dst_k[layer][untouched].any() for layer in range(LAYOUT.num_layers))
    receivers = [r for _, r in transfers.values()]
    assert [r.first_token_id for r in receivers] == [100, 101, 102]
    assert torch.equal(receivers[0].draft_features, features) and receivers[1].draft_features is None
    sender_a, receiver_a = transfers["a"]
    kv_bytes = 2 * 3 * LAYOUT.block_bytes() * LAYOUT.num_layers
    assert receiver_a.bytes_received == sender_a.bytes_sent == kv_bytes + features.numel() * 4
    assert receiver_a.transfer_seconds is not None and sender_a.transfer_seconds is not None
    assert len(pair.finished) == 6


def test_corrupted_layer_payload_fails_the_receiver_with_checksum(pair):
    target = TransferTarget("r", "d", (1, 2), 8)
    receiver = KVReceiver(target, LAYOUT)
    pair.endpoint.register(receiver)
    sender = KVSender(target, LAYOUT, CorruptingChannel(pair.channel, corrupt_send=4))  # layer 1's payload
    for layer in range(LAYOUT.num_layers):
        pair.send_layer(sender, layer, [3, 4])
    _wait_for(lambda: receiver.poll() is TransferState.FAILED)
    assert receiver.failure_reason == "checksum"
    assert not pair.dst_k[1].any(), "a payload that failed its checksum must not be scattered"


@pytest.mark.parametrize("progress", ["waiting", "transferring"])
def test_lease_expiry_fails_both_sides(pair, progress):
    sender, receiver = pair.request("r", 4, (2,), lease=1.0)
    if progress == "transferring":
        pair.send_layer(sender, 0, [1])
        _wait_for(lambda: receiver.poll() is TransferState.TRANSFERRING)
        assert sender.poll() is TransferState.TRANSFERRING
    else:
        assert (sender.poll(), receiver.poll()) == (TransferState.WAITING, TransferState.WAITING)
    time.sleep(1.1)
    # receiver first: otherwise the sender's ABORT frame may beat the receiver's own lease check
    assert (receiver.poll(), sender.poll()) == (TransferState.FAILED, TransferState.FAILED)
    assert sender.failure_reason == receiver.failure_reason == "lease_expired"
    assert sorted(map(id, pair.finished)) == sorted([id(sender), id(receiver)])


def _send_toward(pair: Pair, sender: KVSender, state: TransferState) -> None:
    """What a sender sends to bring its transfer to `state`: one layer (TRANSFERRING), or every layer and
    the first token (DONE); nothing for the other states."""
    if state in (TransferState.TRANSFERRING, TransferState.DONE):
        for layer in range(LAYOUT.num_layers if state is TransferState.DONE else 1):
            pair.send_layer(sender, layer, [1])
        if state is TransferState.DONE:
            sender.send_final(7)


def _drive_receiver_to(pair: Pair, state: TransferState) -> KVReceiver:
    sender, receiver = pair.request(
        f"r-{state.value}", 4, (2,), register=state is not TransferState.BOOTSTRAPPING
    )
    _send_toward(pair, sender, state)
    if state is TransferState.FAILED:
        receiver.abort("first")
    _wait_for(lambda: receiver.poll() is state)
    return receiver


@pytest.mark.parametrize("state", list(TransferState))
def test_receiver_abort_in_every_state_calls_on_finish_once(pair, state):
    receiver = _drive_receiver_to(pair, state)
    receiver.abort("client_gone")
    receiver.abort("again")
    assert receiver.poll() is (TransferState.DONE if state is TransferState.DONE else TransferState.FAILED)
    expected_reason = {TransferState.DONE: None, TransferState.FAILED: "first"}.get(state, "client_gone")
    assert receiver.failure_reason == expected_reason
    assert [f for f in pair.finished if f is receiver] == [receiver]


@pytest.mark.parametrize("state", list(TransferState))
def test_sender_abort_in_every_state_calls_on_finish_once(pair, state):
    target = TransferTarget(f"s-{state.value}", "d", (2,), 4)
    sender = KVSender(
        target,
        LAYOUT,
        None if state is TransferState.BOOTSTRAPPING else pair.channel,
        on_finish=pair.finished.append,
    )
    _send_toward(pair, sender, state)
    if state is TransferState.FAILED:
        sender.abort("first")
    assert sender.poll() is state
    sender.abort("prefill_cancelled")
    sender.abort("again")
    assert sender.poll() is (TransferState.DONE if state is TransferState.DONE else TransferState.FAILED)
    assert [f for f in pair.finished if f is sender] == [sender]


def test_sender_abort_fails_the_receiver_fast(pair):
    sender, receiver = pair.request("r", 8, (4, 5))
    pair.send_layer(sender, 0, [0, 1])
    sender.abort("prefill_cancelled")
    _wait_for(lambda: receiver.poll() is TransferState.FAILED)
    assert receiver.failure_reason == "peer_aborted"
    assert "prefill_cancelled" in receiver.failure_detail


def test_frames_for_an_aborted_request_are_dropped_and_its_blocks_untouched(pair):
    sender_a, receiver_a = pair.request("gone", 8, (4, 5))
    sender_b, receiver_b = pair.request("live", 4, (9,))
    receiver_a.abort("client_gone")
    for layer in range(LAYOUT.num_layers):
        pair.send_layer(sender_a, layer, [0, 1])
        pair.send_layer(sender_b, layer, [2])
    sender_a.send_final(1)
    sender_b.send_final(2)
    _wait_for(lambda: receiver_b.poll() is TransferState.DONE)
    assert pair.endpoint.frames_dropped == LAYOUT.num_layers + 1
    assert not any(
        pair.dst_k[layer][[4, 5]].any() or pair.dst_v[layer][[4, 5]].any()
        for layer in range(LAYOUT.num_layers)
    )
    assert torch.equal(pair.dst_k[3][9], pair.src_k[3][2])
    assert receiver_a.state is TransferState.FAILED and receiver_a.bytes_received == 0


def test_frames_for_an_unregistered_request_are_dropped(pair):
    sender, _ = pair.request("nobody", 4, (3,), register=False)
    for layer in range(LAYOUT.num_layers):
        pair.send_layer(sender, layer, [0])
    sender.send_final(1)
    _wait_for(lambda: pair.endpoint.frames_dropped == LAYOUT.num_layers + 1)
    assert not pair.dst_k[0].any()


def test_stop_releases_the_reader_thread():
    _, decode_end = LoopbackChannel.pair()
    dst_k, dst_v = _caches(None)
    endpoint = KVReceiveEndpoint(decode_end, LAYOUT, dst_k, dst_v)
    endpoint.start()
    endpoint.stop(timeout=5)
    assert not endpoint._thread.is_alive()


def test_garbage_on_the_wire_fails_the_transfer_running_over_it(pair):
    sender, receiver = pair.request("r", 4, (2,))
    pair.send_layer(sender, 0, [1])
    _wait_for(lambda: receiver.poll() is TransferState.TRANSFERRING)
    pair.channel.send(torch.zeros(40, dtype=torch.int64))  # a header-sized blob with no magic
    _wait_for(lambda: receiver.poll() is TransferState.FAILED)
    assert receiver.failure_reason == "protocol_error"
    assert not pair.endpoint.alive


def test_send_layer_after_abort_is_a_no_op(pair):
    sender, _ = pair.request("r", 4, (2,))
    sender.abort("cancelled")
    pair.send_layer(sender, 0, [1])
    assert sender.bytes_sent == 0


def test_layer_of_the_wrong_size_fails_the_receiver_with_size_mismatch(pair):
    receiver = KVReceiver(TransferTarget("r", "d", (4, 5), 8), LAYOUT)  # expects 2 blocks
    pair.endpoint.register(receiver)
    sender = KVSender(TransferTarget("r", "d", (4,), 4), LAYOUT, pair.channel)  # sends 1
    pair.send_layer(sender, 0, [1])
    _wait_for(lambda: receiver.poll() is TransferState.FAILED)
    assert receiver.failure_reason == "size_mismatch"
    assert not pair.dst_k[0].any()


def test_peer_closing_fails_only_the_transfer_running_over_the_channel(pair):
    sender, running = pair.request("running", 4, (2,))
    _, idle = pair.request("idle", 4, (3,))
    pair.send_layer(sender, 0, [1])
    _wait_for(lambda: running.poll() is TransferState.TRANSFERRING)
    pair.channel.close()
    _wait_for(lambda: running.poll() is TransferState.FAILED)
    assert running.failure_reason == "channel_error"
    assert idle.poll() is TransferState.WAITING  # another prefill worker's channel may still serve it
    assert not pair.endpoint.alive


def test_stopping_a_replaced_endpoint_fails_its_transfer_now_and_a_waiting_one_moves_on(pair):
    """A prefill worker rejoined (new incarnation): the decode worker stops the old endpoint and registers the
    reservations still waiting on the new one (DecodeService._add_endpoint)."""
    sender, running = pair.request("running", 4, (2,), lease=60.0)
    _, waiting = pair.request("waiting", 4, (3,), lease=60.0)
    pair.send_layer(sender, 0, [1])
    _wait_for(lambda: running.poll() is TransferState.TRANSFERRING)
    new_prefill_end, new_decode_end = LoopbackChannel.pair()
    new_endpoint = KVReceiveEndpoint(new_decode_end, LAYOUT, pair.dst_k, pair.dst_v)
    new_endpoint.start()
    new_endpoint.register(waiting)
    pair.endpoint.stop()
    assert running.poll() is TransferState.FAILED and running.failure_reason == "channel_error"
    assert waiting.poll() is TransferState.WAITING
    resent = KVSender(waiting.target, LAYOUT, new_prefill_end)
    for layer in range(LAYOUT.num_layers):
        resent.send_layer(layer, pair.src_k[layer], pair.src_v[layer], [5])
    resent.send_final(7)
    _wait_for(lambda: waiting.poll() is TransferState.DONE)
    assert torch.equal(pair.dst_k[1][3], pair.src_k[1][5]) and waiting.first_token_id == 7
    new_endpoint.stop()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_transfer_between_cuda_caches_matches_the_source_blocks():
    prefill_end, decode_end = LoopbackChannel.pair("cuda")
    dst_k = [torch.zeros(NUM_BLOCKS, *LAYOUT.block_shape, device="cuda") for _ in range(LAYOUT.num_layers)]
    dst_v = [torch.zeros_like(k) for k in dst_k]
    endpoint = KVReceiveEndpoint(decode_end, LAYOUT, dst_k, dst_v)
    endpoint.start()
    src_k, src_v = ([c.cuda() for c in caches] for caches in _caches(seed=3))
    target = TransferTarget("r", "d", (5, 1, 14), 10)
    receiver = KVReceiver(target, LAYOUT)
    endpoint.register(receiver)
    sender = KVSender(target, LAYOUT, prefill_end)
    for layer in range(LAYOUT.num_layers):
        sender.send_layer(layer, src_k[layer], src_v[layer], [0, 9, 3])
    sender.send_final(11, torch.ones(1, 8, device="cuda", dtype=torch.bfloat16))
    _wait_for(lambda: receiver.poll() is TransferState.DONE and sender.poll() is TransferState.DONE)
    for layer in range(LAYOUT.num_layers):
        assert torch.equal(dst_k[layer][[5, 1, 14]], src_k[layer][[0, 9, 3]])
        assert torch.equal(dst_v[layer][[5, 1, 14]], src_v[layer][[0, 9, 3]])
    assert receiver.draft_features.device.type == "cuda" and receiver.first_token_id == 11
    endpoint.stop()
