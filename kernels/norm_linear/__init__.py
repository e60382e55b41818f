"""RMSNorm (+ residual) fused into the linear after it."""
