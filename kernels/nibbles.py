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
# 16-bit bits of 1.0 and of -(BASE + 8) per BASE's bits: (BASE + q) · 1 − (BASE + 8) = q − 8, exact
_CENTER = {0x4300: (0x3F80, 0xC308), 0x6400: (0x3C00, 0xE408)}


def _centered_ptx(magic: int, kind: str) -> str:
    """As _quads_ptx, then each pair moved from BASE + q to q − 8 by one fma (exact: q − 8 is a 16-bit
    float in both formats)."""
    one, neg = (f"{bits * 0x10001:#010x}" for bits in _CENTER[magic])
    pair = f"{magic * 0x10001:#010x}"
    lops = " ".join(f"lop3.b32 t{j}, {src}, 0x000F000F, {pair}, 0xEA; fma.rn.{kind} ${j}, t{j}, one, neg;"
                    for j, src in enumerate(("$4", "a", "b", "c")))
    return (f"{{ .reg .b32 a, b, c, t0, t1, t2, t3, one, neg; mov.b32 one, {one}; mov.b32 neg, {neg};"
            f" shr.u32 a, $4, 4; shr.u32 b, $4, 8; shr.u32 c, $4, 12; {lops} }}")


_CENTERED_BF16 = tl.constexpr(_centered_ptx(MAGIC[torch.bfloat16][0], "bf16x2"))
_CENTERED_FP16 = tl.constexpr(_centered_ptx(MAGIC[torch.float16][0], "f16x2"))


@triton.jit
def quads(h, MAGIC_BITS: tl.constexpr, DTYPE: tl.constexpr, PTX: tl.constexpr, CENTER: tl.constexpr = False):
    """int16 [..] → four DTYPE tensors [..]: BASE + nibble j (bits 4j .. 4j + 3) of each quad, exact; CENTER:
    nibble j − 8 instead (one fma a pair more), so products with them carry no BASE and no large term
    cancels in their sums."""
    if PTX:  # two quads a register: one LOP3 makes a value of each
        if CENTER and MAGIC_BITS == 0x4300:
            t0, t1, t2, t3 = _asm(h, _CENTERED_BF16, MAGIC_BITS)
        elif CENTER:
            t0, t1, t2, t3 = _asm(h, _CENTERED_FP16, MAGIC_BITS)
        elif MAGIC_BITS == 0x4300:
            t0, t1, t2, t3 = _asm(h, _QUADS_BF16, MAGIC_BITS)
        else:
            t0, t1, t2, t3 = _asm(h, _QUADS_FP16, MAGIC_BITS)
    else:
        w = h.to(tl.int32)
        t0 = _nibble(w, 0, MAGIC_BITS, DTYPE, CENTER)
        t1 = _nibble(w, 4, MAGIC_BITS, DTYPE, CENTER)
        t2 = _nibble(w, 8, MAGIC_BITS, DTYPE, CENTER)
        t3 = _nibble(w, 12, MAGIC_BITS, DTYPE, CENTER)
    return t0, t1, t2, t3


@triton.jit
def _asm(h, ASM: tl.constexpr, MAGIC_BITS: tl.constexpr):
    """The four outputs of ASM (a quads PTX string) over int16 h, 16-bit floats of MAGIC_BITS' format."""
    if MAGIC_BITS == 0x4300:
        t0, t1, t2, t3 = tl.inline_asm_elementwise(
            ASM, "=r,=r,=r,=r,r", [h], dtype=(tl.bfloat16,) * 4, is_pure=True, pack=2)
    else:
        t0, t1, t2, t3 = tl.inline_asm_elementwise(
            ASM, "=r,=r,=r,=r,r", [h], dtype=(tl.float16,) * 4, is_pure=True, pack=2)
    return t0, t1, t2, t3


@triton.jit
def _nibble(w, SHIFT: tl.constexpr, MAGIC_BITS: tl.constexpr, DTYPE: tl.constexpr, CENTER: tl.constexpr):
    """quads' bits without PTX: the nibble at SHIFT of int32 w, as BASE + q (or q − 8)."""
    q = (w >> SHIFT) & 0xF
    if CENTER:
        return (q - 8).to(DTYPE)
    return (q | MAGIC_BITS).to(tl.int16).to(DTYPE, bitcast=True)


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
