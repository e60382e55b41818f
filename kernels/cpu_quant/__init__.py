"""GGUF Q4_1 / Q8_0 weights × fp32 activations on CPU: an AVX2 C kernel library and its torch references."""
