"""Quantized linears on GPU: W4A16 dequant-GEMM, weight-only int8 GEMV and W8A8 int8 GEMM (Triton)."""
