"""Runs the Triton kernels in tests/kernels in the interpreter on CPU tensors (env var set before imports)."""
from __future__ import annotations

import importlib
import os
import sys

# triton.jit picks interpreted vs compiled when a kernel is decorated, i.e. when its module is first imported.
os.environ["TRITON_INTERPRET"] = "1"

# In a whole-suite run tests/gpu may have imported the kernels compiled already: re-decorate them so this
# folder's CPU tensors reach the interpreter (tests/gpu then skips itself: it checks the env var per test).
# Helpers first (pdl, the KV store, the linear tiles): the kernel modules reloaded after them pick up their
# re-decorated functions.
_KERNEL_MODULES = ("kernels.pdl", "kernels.store_kv.kernel", "kernels.rmsnorm.kernel",
                   "kernels.rotary.kernel", "kernels.attention.tiles", "kernels.attention.kernel",
                   "kernels.activation.kernel",
                   "kernels.linear.kernel", "kernels.norm_linear.kernel", "kernels.norm_qkv_rope.qkv_rope",
                   "kernels.norm_qkv_rope.kernel", "kernels.norm_mlp.kernel",
                   "kernels.quant_linear.common", "kernels.quant_linear.w4a16", "kernels.quant_linear.w8",
                   "kernels.quant_linear.act_quant", "kernels.quant_linear.w8a8")
for _name in _KERNEL_MODULES:
    if _name in sys.modules:
        importlib.reload(sys.modules[_name])
