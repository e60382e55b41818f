"""Torch-free dataclasses that cross process boundaries (router, workers, KV transfer)."""
