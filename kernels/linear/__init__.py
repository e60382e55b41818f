"""Bias-free linears: the skinny decode GEMM, its launch config, and the modules that call it."""
