"""Instruction mix of quantized kernels' main loops, compiled for sm_90 on a machine without a GPU.

`python -m bench.kernels.sass_mix` compiles kernels/attention's decode kernel (Llama-3-8B heads, 64-key tiles,
4 splits) for the bf16 cache and each int8 / int4 mode, and the W4A16 int32-word GEMV (BLOCK_K 1024, 4
warps, 2 stages, pointers and strides 16-divisible as the launcher specializes them) with nibbles shifted or
read in place, and the stationary W4A16 GEMV at its candidate tiles; disassembles each with the nvdisasm
Triton ships and prints the instructions of the longest loop body (per weight value for the GEMVs) and its
local-memory (spill) traffic: a GPU-free check of a
dequantization change before an H100 run times it (bench/kernels/quant_gpu.py). Then the int4 quad decode
kernel at its launch's tiles: its loop per K/V value, and whether its code loads are pipelined (the deepest
cp.async wait, shared memory growing with the stages), the same for the int8 pairs decode kernel; and the
one-row w8 GEMV with its loop plain or
pipelined (cp.async copies, shared memory, registers).
"""
from __future__ import annotations

import collections
import inspect
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels.attention.kernel import _decode_kernel
from kernels.quant_linear.w4a16_gemv import _w4a16_gemv_words_kernel

_POINTERS = dict(block_tables_ptr="*i32", seq_lens_ptr="*i32", query_start_ptr="*i32", out_ptr="*bf16",
                 q_ptr="*bf16", part_acc_ptr="*fp32", part_ml_ptr="*fp32", arrivals_ptr="*i32",
                 k_scale_ptr="*fp16", k_zero_ptr="*fp16", v_scale_ptr="*fp16", v_zero_ptr="*fp16",
                 scale_log2="fp32")
_CACHE_DTYPE = {0: "*bf16", 8: "*i8", 4: "*u8"}
# name → (KV_BITS, INT4_DEQUANT, num_stages): the split-K kernel's stages for each cache (config.py)
VARIANTS = {"bf16": (0, 0, 2), "int8": (8, 0, 3), "int4 dequant 0": (4, 0, 2), "int4 dequant 1": (4, 1, 2)}


_GEMV_SIGNATURE = dict(x_ptr="*i32", w_ptr="*i32", s_ptr="*fp16", z_ptr="*fp16", out_ptr="*bf16",
                       part_ptr="*fp32", arrivals_ptr="*i32", N="i32", K="i32", stride_wn="i32",
                       stride_sn="i32", ONE="i32")


def disassemble(compiled) -> str:
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        return subprocess.run([nvdisasm, "-c", cubin.name], capture_output=True, text=True, check=True).stdout


def gemv_sass(block_n: int, group: int) -> str:
    constexprs = dict(GROUP=group, BLOCK_N=block_n, BLOCK_K=1024, SPLIT_K=1, EVEN_N=True, MERGE=False,
                      USE_PDL=False)
    names = list(inspect.signature(_w4a16_gemv_words_kernel.fn).parameters)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in _GEMV_SIGNATURE
             if n not in ("out_ptr", "part_ptr", "arrivals_ptr")}
    signature = {n: "constexpr" if n in constexprs else _GEMV_SIGNATURE[n] for n in names}
    source = ASTSource(_w4a16_gemv_words_kernel, signature, constexprs, attrs)
    return disassemble(triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                      options=dict(num_warps=4, num_stages=2)))


def bytes_gemv_compile(block_n: int = 4, block_k: int = 1024, group: int = 128):
    """w4a16_gemv's byte GEMV (the one-row default before the stationary one), bf16 input as int32 pairs."""
    from kernels.quant_linear.w4a16_gemv import _w4a16_gemv_bytes_kernel

    constexprs = dict(GROUP=group, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=1, EVEN_N=True, MERGE=False,
                      USE_PDL=True, BF16_PAIRS=True)
    pointers = dict(_GEMV_SIGNATURE, p_ptr="*u8", stride_pn="i32")
    names = list(inspect.signature(_w4a16_gemv_bytes_kernel.fn).parameters)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in pointers
             if n in names and n not in ("out_ptr", "part_ptr", "arrivals_ptr", "N", "ONE")}
    signature = {n: "constexpr" if n in constexprs else pointers[n] for n in names}
    return triton.compile(ASTSource(_w4a16_gemv_bytes_kernel, signature, constexprs, attrs),
                          target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=2))


def stationary_compile(block_n: int, block_k: int, warps: int, split: int, group: int = 128,
                       stages: int = 1, per_sm: int = 4):
    """kernels/quant_linear/w4a16_stationary's GEMV, eight row blocks a program, pointers 16-divisible,
    registers capped as the launcher caps them for per_sm programs an SM."""
    from kernels.quant_linear.config import QuantConfig
    from kernels.quant_linear.w4a16_stationary import _w4a16_stationary_kernel, register_cap

    constexprs = dict(GROUP=group, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, BLOCKS=8,
                      SPAN_P2=8 * block_n, EVEN_N=True, USE_PDL=True, SILU_MUL=False,
                      STAGES=stages)
    names = list(inspect.signature(_w4a16_stationary_kernel.fn).parameters)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in _GEMV_SIGNATURE
             if n not in ("out_ptr", "part_ptr", "arrivals_ptr", "N", "ONE")}
    types = dict(_GEMV_SIGNATURE, ROW_BLOCKS="i32")
    signature = {n: "constexpr" if n in constexprs else types[n] for n in names}
    return triton.compile(ASTSource(_w4a16_stationary_kernel, signature, constexprs, attrs),
                          target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps, num_stages=stages, maxnreg=register_cap(
                              QuantConfig(block_n, block_k, warps, stages, per_sm=per_sm))))


_W8_SIGNATURE = dict(x_ptr="*bf16", w_ptr="*i8", scale_ptr="*fp32", out_ptr="*bf16", M="i32", N="i32",
                     K="i32", stride_xm="i32", stride_wn="i32", stride_om="i32")


def w8_compile(block_n: int, block_k: int, stages: int):
    """The one-row w8 GEMV (quant_linear/w8.py) with its K loop asked for `stages` (tl.range num_stages)."""
    from kernels.quant_linear.w8 import _w8_kernel

    constexprs = dict(BLOCK_M=1, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=1, USE_DOT=False, EVEN_N=True,
                      DOT_PRECISION="tf32", STAGES=stages, USE_PDL=True)
    names = list(inspect.signature(_w8_kernel.fn).parameters)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in _W8_SIGNATURE if n not in ("M", "N")}
    signature = {n: "constexpr" if n in constexprs else _W8_SIGNATURE[n] for n in names}
    return triton.compile(ASTSource(_w8_kernel, signature, constexprs, attrs),
                          target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=stages))


def sass(bits: int, int4_dequant: int, stages: int) -> str:
    constexprs = dict(GROUP=4, BLOCK_G=16, HEAD_DIM=128, BLOCK_D=128, BLOCK_SIZE=16, BLOCK_N=64, NUM_SPLITS=4,
                      MIXED=False, MERGE_IN_PLACE=True, BLOCK_S=4, DOT_PRECISION="tf32", USE_PDL=False,
                      PRELOAD=True, KV_BITS=bits, K_GROUP=32 if bits == 4 else 0,
                      V_GROUP=64 if bits == 4 else 0, HADAMARD=bits == 4, INT4_DEQUANT=int4_dequant)
    pointers = dict(_POINTERS, k_cache_ptr=_CACHE_DTYPE[bits], v_cache_ptr=_CACHE_DTYPE[bits])
    signature = {name: "constexpr" if name in constexprs else pointers.get(name, "i32")
                 for name in inspect.signature(_decode_kernel.fn).parameters}
    return disassemble(triton.compile(ASTSource(_decode_kernel, signature, constexprs),
                                      target=GPUTarget("cuda", 90, 32),
                                      options=dict(num_warps=4, num_stages=stages)))


_QUAD_POINTERS = dict(q_ptr="*bf16", k_ptr="*i16", v_ptr="*i16", ks_ptr="*fp16", kz_ptr="*fp16",
                      vs_ptr="*fp16", vz_ptr="*fp16", block_tables_ptr="*i32", seq_lens_ptr="*i32",
                      query_start_ptr="*i32", out_ptr="*bf16", part_acc_ptr="*fp32", part_ml_ptr="*fp32",
                      arrivals_ptr="*i32", scale_log2="fp32")


def quads_compile(block_n: int, stages: int, max_registers: int = 0):
    """kernels/attention/int4_decode's kernel at Llama-3-8B heads (4 query heads a KV head, 32-value key and
    64-value value groups, rotated), bf16 queries, 4 warps, 4 splits merged in place; pointers and strides
    16-divisible as the launcher specializes them."""
    from kernels.attention.int4_decode import _int4_decode_kernel

    constexprs = dict(GROUP=4, BLOCK_G=8, HEAD_DIM=128, BLOCK_SIZE=16, BLOCK_N=block_n, NUM_SPLITS=4,
                      MIXED=False, MERGE_IN_PLACE=True, BLOCK_S=4, USE_PDL=False, K_GROUP=32, V_GROUP=64,
                      HADAMARD=True, MAGIC_BITS=0x4300, PTX=True)
    names = list(inspect.signature(_int4_decode_kernel.fn).parameters)
    signature = {n: "constexpr" if n in constexprs else _QUAD_POINTERS.get(n, "i32") for n in names}
    unaligned = ("seq_lens_ptr", "query_start_ptr", "arrivals_ptr")
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n.endswith("_ptr") and n not in unaligned or n.startswith("stride_")}
    options = dict(num_warps=4, num_stages=stages, **({"maxnreg": max_registers} if max_registers else {}))
    return triton.compile(ASTSource(_int4_decode_kernel, signature, constexprs, attrs),
                          target=GPUTarget("cuda", 90, 32), options=options)


_PAIR_POINTERS = dict(_QUAD_POINTERS, ks_ptr="*fp16", vs_ptr="*fp16")


def pairs_compile(block_n: int, warps: int, stages: int):
    """kernels/attention/int8_decode's kernel at Llama-3-8B heads (4 query heads a KV head, padded to 16
    rows), bf16 queries, 4 splits merged in place; pointers and slot strides 16-divisible as the launcher
    specializes them."""
    from kernels.attention.int8_decode import _int8_decode_kernel

    constexprs = dict(GROUP=4, BLOCK_G=16, HEAD_DIM=128, BLOCK_SIZE=16, BLOCK_N=block_n, NUM_SPLITS=4,
                      MIXED=False, MERGE_IN_PLACE=True, BLOCK_S=4, USE_PDL=False, HADAMARD=False, PTX=True)
    names = list(inspect.signature(_int8_decode_kernel.fn).parameters)
    signature = {n: "constexpr" if n in constexprs else _PAIR_POINTERS.get(n, "i32") for n in names}
    unaligned = ("seq_lens_ptr", "query_start_ptr", "arrivals_ptr", "stride_ks_h", "stride_vs_h")
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if (n.endswith("_ptr") or n.startswith("stride_")) and n not in unaligned}
    return triton.compile(ASTSource(_int8_decode_kernel, signature, constexprs, attrs),
                          target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))


def registers(compiled) -> str:
    """cuobjdump's register count of a compiled kernel (the one Triton ships)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([tool, "-res-usage", cubin.name], capture_output=True, text=True).stdout
    return m.group(1) if (m := re.search(r"REG:(\d+)", usage)) else "?"


def loop_mix(text: str) -> collections.Counter:
    """Opcode counts of the longest body between a label and a branch back to it."""
    lines = text.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"\s*\.?(L_x_\d+):", line))}
    best: list[str] = []
    for i, line in enumerate(lines):
        m = re.search(r"BRA\s+`?\(?\.?(L_x_\d+)", line)
        if m and labels.get(m.group(1), i) < i and i - labels[m.group(1)] > len(best):
            best = lines[labels[m.group(1)]:i + 1]
    ops = (re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line) for line in best)
    return collections.Counter(m.group(1) for m in ops if m)


def main() -> None:
    print(f"# triton {triton.__version__}, sm_90 decode kernel, head_dim 128, 64-key tiles")
    for name, variant in VARIANTS.items():
        mix = loop_mix(sass(*variant))
        spills = mix["LDL"] + mix["STL"]
        top = ", ".join(f"{op} {n}" for op, n in mix.most_common(6))
        print(f"{name:16s} loop {sum(mix.values()):5d} instructions, spills {spills:4d} | {top}", flush=True)
    print("# W4A16 words GEMV, one bf16 row, BLOCK_K 1024: loop instructions per weight value of a thread")
    for block_n in (16, 32):
        for group in (32, 128):
            mix = loop_mix(gemv_sass(block_n, group))
            per_value = sum(mix.values()) / (block_n * 1024 / 128)
            top = ", ".join(f"{op} {n}" for op, n in mix.most_common(6))
            print(f"gemv {block_n:2d} rows g{group:<3d} {per_value:5.2f} per value | {top}", flush=True)
    print("# W4A16 one-row GEMVs, g128: loop instructions per weight value of a thread, registers")
    compiled = bytes_gemv_compile()
    mix = loop_mix(disassemble(compiled))
    print(f"bytes 4 x 1024, 4 warps: {sum(mix.values()) / 32:4.2f} per value, "
          f"{registers(compiled)} registers", flush=True)
    for block_n, block_k, warps, split, stages, per_sm in (
            (4, 4096, 4, 1, 1, 4), (4, 4096, 4, 1, 3, 4), (4, 4096, 4, 1, 1, 5), (8, 2048, 4, 7, 3, 4),
            (8, 2048, 4, 7, 1, 4), (4, 2048, 2, 7, 1, 8), (8, 4096, 8, 1, 1, 2)):
        compiled = stationary_compile(block_n, block_k, warps, split, stages=stages, per_sm=per_sm)
        text = disassemble(compiled)
        mix = loop_mix(text)
        top = ", ".join(f"{op} {n}" for op, n in mix.most_common(6))
        print(f"stationary {block_n} x {block_k}, {warps} warps, {stages} stages, {per_sm} an SM: "
              f"{text.count('LDGSTS')} LDGSTS, {text.count('LDL') + text.count('STL')} spill ops, "
              f"{sum(mix.values()) / (block_n * block_k / (32 * warps)):4.2f} per value, "
              f"{registers(compiled)} registers | {top}", flush=True)
    print("# w8 one-row GEMV, 4 warps: the loop asked for 1 stage (plain loads) or pipelined (cp.async)")
    for block_n, block_k, stages in ((4, 1024, 1), (4, 1024, 3), (8, 512, 1), (8, 512, 3)):
        compiled = w8_compile(block_n, block_k, stages)
        text = disassemble(compiled)
        print(f"w8 {block_n} x {block_k} stages {stages}: {text.count('LDGSTS')} LDGSTS, "
              f"{compiled.metadata.shared} B shared, {registers(compiled)} registers", flush=True)
    print("# int4 KV quad decode (int4_decode.py), 4 warps: loop instructions per K/V value of a thread, the "
          "deepest cp.async wait (groups left in flight), shared memory, registers")
    for block_n, stages, cap in ((64, 3, 0), (64, 3, 168), (64, 4, 168), (128, 3, 0)):
        print(f"quads {block_n:3d} keys {stages} stages cap {cap or '-':>3}: "
              + decode_loop(quads_compile(block_n, stages, cap), block_n, 4), flush=True)
    print("# int8 KV pairs decode (int8_decode.py): the same")
    for block_n, warps, stages in ((64, 4, 3), (64, 4, 4), (128, 4, 3), (128, 8, 3)):
        print(f"pairs {block_n:3d} keys {warps} warps {stages} stages: "
              + decode_loop(pairs_compile(block_n, warps, stages), block_n, warps), flush=True)


def decode_loop(compiled, block_n: int, warps: int) -> str:
    """A decode kernel's loop: instructions a key tile and per K/V value of a thread (head_dim 128), the
    deepest cp.async wait, shared memory, registers, the commonest opcodes."""
    text = disassemble(compiled)
    mix = loop_mix(text)
    depth = max(map(int, re.findall(r"DEPBAR\.LE SB0, 0x([0-9a-f]+)", text) or ["0"]), default=0)
    top = ", ".join(f"{op} {n}" for op, n in mix.most_common(6))
    count = sum(mix.values())
    return (f"loop {count}, {count / (block_n * 256 / (32 * warps)):4.2f} per value, wait depth {depth}, "
            f"{compiled.metadata.shared} B shared, {registers(compiled)} registers | {top}")


if __name__ == "__main__":
    main()
