"""Fused GPU data plane (CUDA kernels through cuda-python, expert GEMMs through CUTLASS).

Nothing here imports a CUDA package at import time; submodules load cuda-python lazily.
"""


def __getattr__(name: str):
    # eep.fused.MoELayer without importing the layer (and the reference stack) with the package
    if name == "MoELayer":
        from eep.fused.moe_layer import MoELayer
        return MoELayer
    if name == "FusedBuffer":
        from eep.fused.buffer import FusedBuffer
        return FusedBuffer
    if name == "PrefillBuffer":
        from eep.fused.prefill import PrefillBuffer
        return PrefillBuffer
    raise AttributeError(f"module 'eep.fused' has no attribute {name!r}")
