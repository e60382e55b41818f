"""A layer's MLP with the RMSNorm before it as one op (gated GEMM for a few rows)."""
