"""Helpers shared by the test modules (kept out of conftest.py, which other test folders shadow)."""

import torch


def random_experts(num_experts: int, inter: int, hidden: int, *, generator: torch.Generator,
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh random SwiGLU expert weights scaled so activations stay O(1)."""
    w_gate = torch.randn(num_experts, inter, hidden, generator=generator) / hidden ** 0.5
    w_up = torch.randn(num_experts, inter, hidden, generator=generator) / hidden ** 0.5
    w_down = torch.randn(num_experts, hidden, inter, generator=generator) / inter ** 0.5
    return w_gate.to(dtype), w_up.to(dtype), w_down.to(dtype)
