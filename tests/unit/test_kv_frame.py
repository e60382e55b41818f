"""Frames: header encode/decode, header integrity, payload checksum, block gather/scatter."""

from __future__ import annotations

import pytest
import torch

from kv_transfer.errors import FrameError
from kv_transfer.frame import (
    HEADER_WORDS,
    FrameHeader,
    FrameKind,
    decode_header,
    encode_header,
    gather_blocks,
    pack_tensor,
    payload_checksum,
    scatter_blocks,
    unpack_tensor,
)


def test_layer_header_round_trips_with_checksum():
    header = FrameHeader(FrameKind.LAYER, "req-ü-" + "x" * 100, layer=7, payload_bytes=4096, num_blocks=3)
    encoded = encode_header(header, torch.tensor(123456789, dtype=torch.int64), "cpu")
    assert encoded.shape == (HEADER_WORDS,)
    decoded, checksum = decode_header(encoded)
    assert decoded == header
    assert checksum == 123456789


def test_final_header_carries_token_and_aux_tensor_description():
    header = FrameHeader(
        FrameKind.FINAL, "r1", token=49151, payload_bytes=32, aux_dtype=torch.bfloat16, aux_shape=(1, 3, 5)
    )
    decoded, _ = decode_header(encode_header(header, None, "cpu"))
    assert (decoded.token, decoded.aux_dtype, decoded.aux_shape) == (49151, torch.bfloat16, (1, 3, 5))


def test_bad_magic_is_a_frame_error():
    encoded = encode_header(FrameHeader(FrameKind.ABORT, "r"), None, "cpu")
    encoded[0] = 42
    with pytest.raises(FrameError, match="magic"):
        decode_header(encoded)


def test_corrupted_header_field_fails_the_header_check():
    encoded = encode_header(
        FrameHeader(FrameKind.LAYER, "r", layer=1, payload_bytes=64, num_blocks=1), None, "cpu"
    )
    encoded[4] += 16  # payload size: a reader trusting it would desync the stream
    with pytest.raises(FrameError, match="header check"):
        decode_header(encoded)


def test_request_id_longer_than_the_header_holds_is_rejected():
    with pytest.raises(ValueError, match="request id"):
        FrameHeader(FrameKind.ABORT, "x" * 127)


def test_checksum_changes_when_one_bit_flips():
    payload = torch.randint(0, 256, (1024,), dtype=torch.uint8)
    before = int(payload_checksum(payload))
    payload[100] ^= 4
    assert int(payload_checksum(payload)) != before


def test_gather_then_scatter_moves_exactly_the_named_blocks():
    torch.manual_seed(0)
    k = torch.randn(10, 4, 2, 3)  # 96-byte blocks, scales of 3 blocks = 48 bytes: exercises padding
    scales = torch.randn(10, 4)
    payload = gather_blocks([k, scales], torch.tensor([7, 2, 5]))
    assert payload.numel() % 16 == 0
    k_dst, s_dst = torch.zeros_like(k), torch.zeros_like(scales)
    scatter_blocks(payload, [k_dst, s_dst], torch.tensor([0, 1, 9]))
    assert torch.equal(k_dst[[0, 1, 9]], k[[7, 2, 5]])
    assert torch.equal(s_dst[[0, 1, 9]], scales[[7, 2, 5]])
    assert not k_dst[2:9].any()


def test_aux_tensor_round_trips_through_a_payload():
    features = torch.randn(2, 576).to(torch.bfloat16)
    assert torch.equal(unpack_tensor(pack_tensor(features), torch.bfloat16, (2, 576)), features)
