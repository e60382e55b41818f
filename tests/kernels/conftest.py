"""Runs this folder's Triton kernels in the interpreter on CPU tensors (env var set before kernel imports)."""
from __future__ import annotations

import importlib
import os
import sys

# triton.jit picks interpreted vs compiled when a kernel is decorated, i.e. when its module is first imported.
os.environ["TRITON_INTERPRET"] = "1"

# In a whole-suite run tests/gpu may have imported the kernels compiled already: re-decorate them so this
# folder's CPU tensors reach the interpreter (tests/gpu then skips itself: it checks the env var per test).
# triton_pdl first: the kernel modules reloaded after it pick up its re-decorated helpers.
_KERNEL_MODULES = ("kernels.triton_pdl", "kernels.triton_store_kv", "kernels.triton_rmsnorm",
                   "kernels.triton_rotary", "kernels.triton_attention", "kernels.triton_linear",
                   "kernels.triton_activation", "kernels.triton_norm_linear", "kernels.triton_qkv_rope",
                   "kernels.triton_gated_linear")
for _name in _KERNEL_MODULES:
    if _name in sys.modules:
        importlib.reload(sys.modules[_name])
