"""Compiles the kernels/cpu_quant C sources once per flags into a per-user cache and loads them by ctypes."""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

_HERE = Path(__file__).parent
# cpu_quant.c: Q4_1 / Q8_0 products; decode_step.c: the fused bs1 step over them; kv_quant.c: its int8 / int4
# KV store and attention; f32_linear.c: fp32 products.
SOURCES = tuple(_HERE / name for name in ("cpu_quant.c", "decode_step.c", "kv_quant.c", "f32_linear.c"))
HEADERS = (_HERE / "cpu_quant.h",)
BASE_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=c11")
LIBS = ("-lm",)  # expf, sqrtf (the fused decode step's softmax, silu and RMSNorm); after the sources to link
# Only where torch reports AVX2 (it checks FMA with it): the source's #else branch is the scalar path.
SIMD_FLAGS = ("-mavx2", "-mfma", "-mf16c")

_i64, _int, _ptr, _f32 = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
_SIGNATURES = {
    "cq_decode_step": (_ptr, _i64, _i64, _i64, _i64, _f32, _f32, _ptr, _ptr, _ptr, _i64, _i64, _ptr, _int),
    "cq_kv_store_rows": (_ptr, _ptr, _i64, _ptr, _i64, _i64),
    "cq_kv_attend_heads": (_ptr, _i64, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _ptr, _int),
    "q4_1_linear": (_ptr, _i64, _i64, _ptr, _ptr, _ptr, _i64, _ptr, _int),
    "q8_0_linear": (_ptr, _i64, _i64, _ptr, _ptr, _i64, _ptr, _int),
    "q4_1_dequantize": (_ptr, _ptr, _ptr, _i64, _i64, _ptr, _int),
    "q8_0_dequantize": (_ptr, _ptr, _i64, _i64, _ptr, _int),
    "f32_linear": (_ptr, _i64, _i64, _ptr, _i64, _ptr, _ptr, _int),
}


class CompilerMissingError(RuntimeError):
    """No C compiler to build the CPU quantized kernels with."""


def simd_available() -> bool:
    """Whether this CPU runs the AVX2 + FMA build (torch's own dispatch test: AVX2 or AVX512 capability)."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def compile_flags() -> tuple[str, ...]:
    return BASE_FLAGS + (SIMD_FLAGS if simd_available() else ())


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "pdserve" / "cpu_quant"


def build(flags: tuple[str, ...] | None = None, compiler: str = "gcc") -> Path:
    """The shared library for these sources and `flags` (default: compile_flags()), compiled if the cache
    lacks it.

    Several processes (Ray workers) may build at once: each compiles into its own temporary file and
    renames it into place (atomic on one filesystem), so a reader sees a whole library or none.
    """
    flags = compile_flags() if flags is None else flags
    source = b"".join(path.read_bytes() for path in (*SOURCES, *HEADERS))
    key = hashlib.sha256(source + " ".join((compiler, *flags, *LIBS)).encode()).hexdigest()[:16]
    target = cache_dir() / f"cpu_quant-{key}.so"
    if target.exists():
        return target
    if shutil.which(compiler) is None:
        raise CompilerMissingError(
            f"the CPU quantized weight kernels (kernels/cpu_quant) are compiled at model load and need "
            f"`{compiler}` on PATH (apt-get install gcc); it was not found")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *flags, *map(str, SOURCES), "-o", tmp, *LIBS],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"compiling kernels/cpu_quant failed ({compiler} {' '.join(flags)}):\n"
                               f"{result.stderr}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def library(flags: tuple[str, ...] | None = None) -> ctypes.CDLL:
    """The loaded kernels (built on first use) for `flags` (default: this CPU's), argument types declared."""
    lib = ctypes.CDLL(str(build(flags)))
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, None
    lib.cpu_quant_has_avx2.restype = ctypes.c_int
    return lib
