"""Fused GPU kernels (Triton). Filled by the fast-step work; the pure-torch references live beside them.

sinkhorn_triton.sinkhorn_fused: Sinkhorn-Knopp codes, same contract and numbers as swav_fast.sinkhorn.sinkhorn.
"""
