"""int4 nibbles → 16-bit floats without a conversion instruction, shared by the tensor-core W4A16 kernel
(kernels/quant_linear/w4a16_mma.py) and the int4 KV decode attention (kernels/attention/int4_decode.py).

A nibble q OR-ed into the mantissa of BASE (128 in bf16, 1024 in fp16: where the spacing of floats is 1)
is the float BASE + q exactly. Packed int4 rows load as int16 "quads": nibble j of quad i is value 4i + j
(two values a byte, low nibble first, little-endian), so a quad tile splits into four tiles, one per
nibble position. On CUDA two quads share a 32-bit register and one LOP3 makes a value of each (inline
PTX); the interpreter runs no PTX, and takes the same bits apart with plain integer ops.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# float dtype → (the bits of BASE, BASE): BASE + q for a nibble q is BASE's bits OR q, spacing 1 there
MAGIC = {torch.bfloat16: (0x4300, 128.0), torch.float16: (0x6400, 1024.0)}


def _quads_ptx(magic: int) -> str:
    """$4: two int16 quads; $0 .. $3: nibble j of both OR-ed into BASE's bits (magic), a 16-bit float each."""
    pair = f"{magic * 0x10001:#010x}"
    return (f"{{ .reg .b32 a, b, c; shr.u32 a, $4, 4; shr.u32 b, $4, 8; shr.u32 c, $4, 12;"
            f" lop3.b32 $0, $4, 0x000F000F, {pair}, 0xEA; lop3.b32 $1, a, 0x000F000F, {pair}, 0xEA;"
            f" lop3.b32 $2, b, 0x000F000F, {pair}, 0xEA; lop3.b32 $3, c, 0x000F000F, {pair}, 0xEA; }}")


_QUADS_BF16 = tl.constexpr(_quads_ptx(MAGIC[torch.bfloat16][0]))
_QUADS_FP16 = tl.constexpr(_quads_ptx(MAGIC[torch.float16][0]))


@triton.jit
def quads(h, MAGIC_BITS: tl.constexpr, DTYPE: tl.constexpr, PTX: tl.constexpr):
    """int16 [..] → four DTYPE tensors [..]: BASE + nibble j (bits 4j .. 4j + 3) of each quad, exact."""
    if PTX and MAGIC_BITS == 0x4300:  # two quads a register: one LOP3 makes a value of each
        t0, t1, t2, t3 = tl.inline_asm_elementwise(
            _QUADS_BF16, "=r,=r,=r,=r,r", [h], dtype=(tl.bfloat16,) * 4, is_pure=True, pack=2)
    elif PTX:
        t0, t1, t2, t3 = tl.inline_asm_elementwise(
            _QUADS_FP16, "=r,=r,=r,=r,r", [h], dtype=(tl.float16,) * 4, is_pure=True, pack=2)
    else:
        w = h.to(tl.int32)
        t0 = ((w & 0xF) | MAGIC_BITS).to(tl.int16).to(DTYPE, bitcast=True)
        t1 = (((w >> 4) & 0xF) | MAGIC_BITS).to(tl.int16).to(DTYPE, bitcast=True)
        t2 = (((w >> 8) & 0xF) | MAGIC_BITS).to(tl.int16).to(DTYPE, bitcast=True)
        t3 = (((w >> 12) & 0xF) | MAGIC_BITS).to(tl.int16).to(DTYPE, bitcast=True)
    return t0, t1, t2, t3


@triton.jit
def half_float(bits, DTYPE: tl.constexpr):
    """The low 16 bits of an int32 tensor read as DTYPE (bf16 or fp16)."""
    return bits.to(tl.int16).to(DTYPE, bitcast=True)


@triton.jit
def quarters(q, DTYPE: tl.constexpr):
    """int64 [..] holding four 16-bit floats (value j in bits 16j ..) → the four as DTYPE tensors."""
    lo = q.to(tl.int32)
    hi = (q >> 32).to(tl.int32)
    return (half_float(lo & 0xFFFF, DTYPE), half_float(lo >> 16, DTYPE), half_float(hi & 0xFFFF, DTYPE),
            half_float(hi >> 16, DTYPE))

