"""Fused GPU data plane (CUDA kernels through cuda-python, expert GEMMs through CUTLASS).

Nothing here imports a CUDA package at import time; submodules load cuda-python lazily.
"""
