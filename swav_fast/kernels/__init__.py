"""Fused GPU kernels (Triton). Filled by the fast-step work; the pure-torch references live beside them."""
