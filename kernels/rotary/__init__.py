"""Rotary embedding (rotate-half), alone and fused with the KV store."""
