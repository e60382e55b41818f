"""A layer's attention input: RMSNorm, qkv projection, rotary and the KV store as one op."""
