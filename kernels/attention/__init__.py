"""Paged attention over the block KV cache: metadata, torch reference, Triton split-K decode and prefill."""
