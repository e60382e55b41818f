"""Self-describing frames: a fixed-size int64 header tensor (kind, request id, sizes, checksum) + payload."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kv_transfer.errors import FrameError

MAGIC = 0x4B5646524D31  # "KVFRM1"
VERSION = 1
HEADER_WORDS = 40
HEADER_BYTES = HEADER_WORDS * 8
MAX_REQUEST_ID_BYTES = 126
ALIGN = 16  # payload segments start 16-byte aligned so any dtype view of them is legal

# Request ids travel 7 bytes per int64 word: words stay below 2**56, so the header check never overflows.
_RID_BYTES_PER_WORD = 7
_RID_WORDS = MAX_REQUEST_ID_BYTES // _RID_BYTES_PER_WORD
_MAGIC, _VERSION, _KIND, _LAYER, _PAYLOAD, _CHECKSUM, _NUM_BLOCKS, _SCALE_BYTES, _TOKEN = range(9)
_AUX_DTYPE, _AUX_SHAPE, _AUX_MAX_DIMS = 9, 10, 4
_RID_LEN = 14
_RID = 15
_HEADER_CHECK = HEADER_WORDS - 1
_CHECK_MOD = 1 << 62

# Codes for the dtype of the FINAL frame's auxiliary tensor (draft features). -1 = none.
AUX_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.uint8,
    torch.int32,
    torch.int64,
    torch.float64,
)


class FrameKind(enum.IntEnum):
    LAYER = 1  # payload = k blocks ‖ v blocks ‖ per-layer extra tensors (scales), each 16-byte aligned
    FINAL = 2  # after the last layer: first sampled token in `token`, draft features as payload (optional)
    ABORT = 3  # payload = utf-8 reason; the receiver fails fast


@dataclass(frozen=True)
class FrameHeader:
    kind: FrameKind
    request_id: str
    layer: int = -1
    payload_bytes: int = 0
    num_blocks: int = 0
    scale_bytes: int = 0  # bytes of the payload after k and v (quantization scales); 0 for float caches
    token: int = -1
    aux_dtype: torch.dtype | None = None
    aux_shape: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        rid = self.request_id.encode()
        if not rid or len(rid) > MAX_REQUEST_ID_BYTES:
            raise ValueError(f"request id must be 1..{MAX_REQUEST_ID_BYTES} utf-8 bytes, got {len(rid)}")
        if self.payload_bytes < 0 or self.payload_bytes % ALIGN:
            raise ValueError(
                f"payload_bytes must be a non-negative multiple of {ALIGN}, got {self.payload_bytes}"
            )
        if self.aux_dtype is not None and self.aux_dtype not in AUX_DTYPES:
            raise ValueError(f"aux tensor dtype {self.aux_dtype} cannot travel in a frame")
        if len(self.aux_shape) > _AUX_MAX_DIMS:
            raise ValueError(f"aux tensor has {len(self.aux_shape)} dims, at most {_AUX_MAX_DIMS} travel")


def _header_check(words: list[int]) -> int:
    # Everything the sender knows on the host; the payload checksum (computed on the device) is excluded.
    return sum(w for i, w in enumerate(words) if i not in (_CHECKSUM, _HEADER_CHECK)) % _CHECK_MOD


def encode_header(h: FrameHeader, checksum: torch.Tensor | None, device: torch.device | str) -> torch.Tensor:
    """The header as an int64 tensor on `device`; `checksum` (0-dim int64, on device) is copied in on-device,
    so a CUDA sender never waits for the GPU to learn it."""
    words = [0] * HEADER_WORDS
    words[_MAGIC], words[_VERSION], words[_KIND], words[_LAYER] = MAGIC, VERSION, int(h.kind), h.layer
    words[_PAYLOAD], words[_NUM_BLOCKS], words[_SCALE_BYTES], words[_TOKEN] = (
        h.payload_bytes,
        h.num_blocks,
        h.scale_bytes,
        h.token,
    )
    words[_AUX_DTYPE] = -1 if h.aux_dtype is None else AUX_DTYPES.index(h.aux_dtype)
    for i in range(_AUX_MAX_DIMS):
        words[_AUX_SHAPE + i] = h.aux_shape[i] if i < len(h.aux_shape) else -1
    rid = h.request_id.encode()
    words[_RID_LEN] = len(rid)
    for i in range(0, len(rid), _RID_BYTES_PER_WORD):
        words[_RID + i // _RID_BYTES_PER_WORD] = int.from_bytes(rid[i : i + _RID_BYTES_PER_WORD], "little")
    words[_HEADER_CHECK] = _header_check(words)
    header = torch.tensor(words, dtype=torch.int64, device=device)
    if checksum is not None:
        header[_CHECKSUM].copy_(checksum)
    return header


def decode_header(t: torch.Tensor) -> tuple[FrameHeader, int]:
    """(header, payload checksum) from a received header tensor; FrameError if it is not a valid header."""
    if t.dtype != torch.int64 or t.numel() != HEADER_WORDS:
        raise FrameError(f"header must be {HEADER_WORDS} int64 words, got {t.numel()} {t.dtype}")
    words = [int(w) for w in t.cpu().tolist()]
    if words[_MAGIC] != MAGIC:
        raise FrameError(f"bad frame magic {words[_MAGIC]:#x}")
    if words[_VERSION] != VERSION:
        raise FrameError(f"frame version {words[_VERSION]} is not supported (this side speaks {VERSION})")
    if words[_HEADER_CHECK] != _header_check(words):
        raise FrameError("frame header check failed")
    try:
        kind = FrameKind(words[_KIND])
        rid_len = words[_RID_LEN]
        rid = b"".join(words[_RID + i].to_bytes(_RID_BYTES_PER_WORD, "little") for i in range(_RID_WORDS))
        aux_code = words[_AUX_DTYPE]
        header = FrameHeader(
            kind=kind,
            request_id=rid[:rid_len].decode(),
            layer=words[_LAYER],
            payload_bytes=words[_PAYLOAD],
            num_blocks=words[_NUM_BLOCKS],
            scale_bytes=words[_SCALE_BYTES],
            token=words[_TOKEN],
            aux_dtype=None if aux_code < 0 else AUX_DTYPES[aux_code],
            aux_shape=tuple(d for d in words[_AUX_SHAPE : _AUX_SHAPE + _AUX_MAX_DIMS] if d >= 0),
        )
    except (ValueError, IndexError, OverflowError, UnicodeDecodeError) as e:
        raise FrameError(f"malformed frame header: {e}") from e
    return header, words[_CHECKSUM]


def payload_checksum(payload: torch.Tensor) -> torch.Tensor:
    """Sum of the payload's int32 words as a 0-dim int64 tensor, computed where the payload lives."""
    # A plain word sum: one cheap pass on the device, catches flipped bits and torn or short writes.
    if payload.dtype != torch.uint8 or payload.numel() % 4:
        raise ValueError("payload must be a uint8 tensor whose length is a multiple of 4")
    return payload.view(torch.int32).sum(dtype=torch.int64)


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def segment_offsets(sizes: Sequence[int]) -> tuple[list[int], int]:
    """Start offset of each segment (16-byte aligned) and the total payload size."""
    offsets, total = [], 0
    for size in sizes:
        offsets.append(total)
        total += aligned(size)
    return offsets, total


def gather_blocks(tensors: Sequence[torch.Tensor], block_ids: torch.Tensor) -> torch.Tensor:
    """One uint8 payload holding `t[block_ids]` of each tensor in turn (one copy, on the tensors' device)."""
    n = block_ids.numel()
    sizes = [n * t[0].numel() * t.element_size() for t in tensors]
    offsets, total = segment_offsets(sizes)
    payload = torch.empty(total, dtype=torch.uint8, device=tensors[0].device)
    for t, off, size in zip(tensors, offsets, sizes, strict=True):
        out = payload[off : off + size].view(t.dtype).view(n, *t.shape[1:])
        torch.index_select(t, 0, block_ids, out=out)
        payload[off + size : off + aligned(size)].zero_()  # padding is checksummed: make it deterministic
    return payload


def scatter_blocks(payload: torch.Tensor, tensors: Sequence[torch.Tensor], block_ids: torch.Tensor) -> None:
    """Inverse of gather_blocks: write each segment into `t[block_ids]`."""
    n = block_ids.numel()
    sizes = [n * t[0].numel() * t.element_size() for t in tensors]
    offsets, _ = segment_offsets(sizes)
    for t, off, size in zip(tensors, offsets, sizes, strict=True):
        t.index_copy_(0, block_ids, payload[off : off + size].view(t.dtype).view(n, *t.shape[1:]))


def expected_layer_bytes(tensors: Sequence[torch.Tensor], num_blocks: int) -> int:
    return segment_offsets([num_blocks * t[0].numel() * t.element_size() for t in tensors])[1]


def pack_bytes(data: bytes, device: torch.device | str) -> torch.Tensor:
    """Raw bytes as an aligned uint8 payload on `device` (for ABORT reasons)."""
    buf = bytearray(data) + bytes(aligned(len(data)) - len(data))
    return torch.frombuffer(buf, dtype=torch.uint8).to(device) if buf else torch.empty(0, dtype=torch.uint8)


def pack_tensor(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes as an aligned uint8 payload on its own device (for FINAL's draft features)."""
    flat = t.detach().contiguous().view(-1)
    nbytes = flat.numel() * flat.element_size()
    payload = torch.zeros(aligned(nbytes), dtype=torch.uint8, device=t.device)
    payload[:nbytes].view(t.dtype).copy_(flat)
    return payload


def unpack_tensor(payload: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    numel = 1
    for d in shape:
        numel *= d
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if nbytes > payload.numel():
        raise FrameError(f"aux tensor {shape} {dtype} needs {nbytes} bytes, payload has {payload.numel()}")
    return payload[:nbytes].view(dtype).view(shape).clone()
