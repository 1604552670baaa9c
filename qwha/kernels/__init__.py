"""Triton kernels (used on CUDA; tested on CPU under ``TRITON_INTERPRET=1``)."""
