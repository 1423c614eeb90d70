"""Compute kernels with a PyTorch reference and optional fast paths (mamba-ssm, Triton)."""
