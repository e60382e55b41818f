"""LoopbackChannel: ordering, buffering both ways, size checks, and close failing pending operations."""

from __future__ import annotations

import threading

import pytest
import torch

from kv_transfer.channel import LoopbackChannel
from kv_transfer.errors import ChannelClosed, ChannelError, ChannelTimeout

pytestmark = pytest.mark.timeout(30)


def test_sends_arrive_in_order_at_matching_recvs():
    a, b = LoopbackChannel.pair()
    for i in range(3):
        a.send(torch.full((4,), float(i))).wait(1)
    got = [torch.empty(4) for _ in range(3)]
    for t in got:
        b.recv(t).wait(1)
    assert [t[0].item() for t in got] == [0.0, 1.0, 2.0]


def test_recv_posted_before_send_completes_when_data_arrives():
    a, b = LoopbackChannel.pair()
    dst = torch.empty(3, dtype=torch.int64)
    handle = b.recv(dst)
    assert not handle.is_completed()
    a.send(torch.tensor([5, 6, 7]))
    handle.wait(1)
    assert dst.tolist() == [5, 6, 7]


def test_send_copies_so_the_sender_may_reuse_its_buffer():
    a, b = LoopbackChannel.pair()
    src = torch.ones(2)
    a.send(src).wait(1)
    src.zero_()
    dst = torch.empty(2)
    b.recv(dst).wait(1)
    assert dst.tolist() == [1.0, 1.0]


def test_recv_of_wrong_size_fails_the_handle():
    a, b = LoopbackChannel.pair()
    a.send(torch.zeros(4))
    with pytest.raises(ChannelError, match="16 bytes"):
        b.recv(torch.zeros(3)).wait(1)


def test_wait_times_out_while_nothing_arrives():
    _, b = LoopbackChannel.pair()
    with pytest.raises(ChannelTimeout):
        b.recv(torch.zeros(1)).wait(0.05)


def test_close_fails_pending_recv_of_a_blocked_thread():
    a, b = LoopbackChannel.pair()
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            b.recv(torch.zeros(1)).wait(5)
        except ChannelError as e:
            errors.append(e)

    thread = threading.Thread(target=reader)
    thread.start()
    a.close()
    thread.join(5)
    assert not thread.is_alive()
    assert isinstance(errors[0], ChannelClosed)
    with pytest.raises(ChannelClosed):
        a.send(torch.zeros(1))
