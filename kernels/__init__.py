"""Kernels by op (kernels/<op>/: torch reference, Triton kernel, launch config) and the registry of them."""
