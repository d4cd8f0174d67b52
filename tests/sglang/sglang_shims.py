"""Let SGLang 0.5.23's dispatcher, elastic-EP, EPLB and plugin modules import where SGLang was installed
without its requirements' heavy parts (``--no-deps``): the CPU test venv and the GPU scenario.

- torchvision (CPU venv): SGLang's config package imports ``torchvision.transforms`` at module level;
  torchvision is absent from the test venv (its CPU wheel fails to import beside torch 2.13). The shim
  first lets ``transformers`` record that torchvision is absent (its ``is_torchvision_available`` is
  cached), then registers three tiny stand-in modules carrying only the names SGLang reads at import
  time. A no-op where a real torchvision is importable (the GPU machine has one).
- sgl_kernel (CUDA): with a GPU, SGLang imports its CUDA kernel package unconditionally in modules
  the dispatcher's import chain reaches; the stand-in holds exactly the names those imports read
  (``SGL_KERNEL_IMPORTS``, found by importing that chain with sgl_kernel absent), each raising if
  called. Nothing on the dispatcher path calls them: the MoE runners and quantisation kernels that do
  are not part of these tests. Submodules it lacks (``sgl_kernel.scalar_type``) stay absent, so
  SGLang's own fallbacks for a missing sgl_kernel apply. Installed only where CUDA is available and
  the real package is absent.

Test-only: a real SGLang deployment has both packages.
"""

from __future__ import annotations

import enum
import importlib.machinery
import importlib.util
import sys
import types

_TORCHVISION = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")

# module -> names SGLang 0.5.23 imports from it at import time on CUDA (sites in the comments)
SGL_KERNEL_IMPORTS = {
    "sgl_kernel": ("int8_scaled_mm",   # layers/quantization/w8a8_int8.py, compressed_tensors_w8a8_int8.py
                   "moe_sum",          # layers/quantization/gguf.py
                   "moe_sum_reduce"),  # layers/moe/moe_runner/triton_utils/fused_moe.py
    "sgl_kernel.quantization": ("ggml_dequantize", "ggml_moe_a8", "ggml_mul_mat_a8",  # gguf.py
                                "ggml_mul_mat_vec_a8"),
}


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def install() -> None:
    """Idempotent; each stand-in only where its package is missing (see the module docstring)."""
    _install_torchvision()
    _install_sgl_kernel()


def _package(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    module.__path__ = []
    return module


def _install_torchvision() -> None:
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return
    import transformers.utils.import_utils as import_utils

    # Cache "absent" before the stand-in exists, so transformers never takes its torchvision paths.
    assert not import_utils.is_torchvision_available()
    import_utils.is_torchvision_v2_available()
    modules = {name: _package(name) for name in _TORCHVISION}
    modules["torchvision.transforms"].InterpolationMode = InterpolationMode
    modules["torchvision.transforms"].functional = modules["torchvision.transforms.functional"]
    modules["torchvision.transforms.functional"].InterpolationMode = InterpolationMode
    modules["torchvision"].transforms = modules["torchvision.transforms"]
    sys.modules.update(modules)


def _install_sgl_kernel() -> None:
    import torch

    if not torch.cuda.is_available() or "sgl_kernel" in sys.modules or importlib.util.find_spec("sgl_kernel"):
        return
    modules = {name: _package(name) for name in SGL_KERNEL_IMPORTS}
    for name, attrs in SGL_KERNEL_IMPORTS.items():
        for attr in attrs:
            setattr(modules[name], attr, _missing(f"{name}.{attr}"))
    modules["sgl_kernel"].quantization = modules["sgl_kernel.quantization"]
    sys.modules.update(modules)


def _missing(qualname: str):
    def call(*args, **kwargs):
        raise NotImplementedError(f"{qualname}: sgl_kernel is not installed here (tests/sglang/sglang_shims.py "
                                  "stands in for its imports only)")

    call.__qualname__ = call.__name__ = qualname.rsplit(".", 1)[1]
    return call
