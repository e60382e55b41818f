"""Speculative decoding: drafters (n-gram lookup, a learned EAGLE-3-style head) and the head's training."""
