"""The FP8 activation format of dispatch: e4m3 values with one float32 scale per token per 128 channels.

DeepEP's low-latency dispatch and Mooncake EP send this format; eep's host backends and the
reference quantise with these functions, and the fused kernels produce the same values.
``x ~= values.float() * scales`` per 128-channel block; a block's scale is its largest magnitude over
the largest finite e4m3 value, so the block's largest element maps to +-448 exactly.
"""

from __future__ import annotations

import torch

FP8_BLOCK = 128
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_MIN_SCALE = 1e-12  # an all-zero block gets this scale (its values are zeros either way)


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., hidden]`` -> ``(values [..., hidden] float8_e4m3fn, scales [..., hidden // 128] float32)``."""
    if x.shape[-1] % FP8_BLOCK:
        raise ValueError(f"FP8 quantisation needs hidden % {FP8_BLOCK} == 0, got hidden={x.shape[-1]}")
    blocks = x.float().reshape(*x.shape[:-1], x.shape[-1] // FP8_BLOCK, FP8_BLOCK)
    scales = (blocks.abs().amax(-1) / FP8_MAX).clamp(min=FP8_MIN_SCALE)
    values = (blocks / scales.unsqueeze(-1)).to(torch.float8_e4m3fn).reshape(x.shape)
    return values, scales


def dequantize_fp8(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Inverse of ``quantize_fp8``: ``[..., hidden]`` float32. ``scales`` may also hold one scale per
    row (``[...]``), the fused decode kernels' format."""
    shape = values.shape
    if scales.dim() == values.dim() - 1 and tuple(scales.shape) == tuple(shape[:-1]):
        return values.float() * scales.unsqueeze(-1)
    blocks = values.float().reshape(*shape[:-1], shape[-1] // FP8_BLOCK, FP8_BLOCK) * scales.unsqueeze(-1)
    return blocks.reshape(shape)
