import os

import pytest
import torch

# The GPU machines need these in every process; set them for anything a test spawns too.
for _name in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
    os.environ.setdefault(_name, "0" if _name == "NCCL_NVLS_ENABLE" else "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run through the device tool)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def random_experts(num_experts: int, inter: int, hidden: int, *, generator: torch.Generator,
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh random SwiGLU expert weights scaled so activations stay O(1)."""
    w_gate = torch.randn(num_experts, inter, hidden, generator=generator) / hidden ** 0.5
    w_up = torch.randn(num_experts, inter, hidden, generator=generator) / hidden ** 0.5
    w_down = torch.randn(num_experts, hidden, inter, generator=generator) / inter ** 0.5
    return w_gate.to(dtype), w_up.to(dtype), w_down.to(dtype)
