"""Let SGLang 0.5.23's dispatcher, elastic-EP, EPLB and plugin modules import on a CPU-only box.

Their import chain reaches ``sglang.srt.configs``, whose vision configs do
``import torchvision.transforms`` at module level; torchvision is absent from the test venv (its CPU
wheel fails to import beside torch 2.13). ``install()`` first lets ``transformers`` record that
torchvision is absent (its ``is_torchvision_available`` is cached), then puts three tiny stand-in
modules in ``sys.modules`` carrying only the names SGLang reads at import time. Test-only: a real
SGLang deployment has torchvision.
"""

from __future__ import annotations

import enum
import importlib.machinery
import importlib.util
import sys
import types

_NAMES = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def install() -> None:
    """Idempotent; a no-op where a real torchvision is importable or already imported."""
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return
    import transformers.utils.import_utils as import_utils

    # Cache "absent" before the stand-in exists, so transformers never takes its torchvision paths.
    assert not import_utils.is_torchvision_available()
    import_utils.is_torchvision_v2_available()
    modules = {}
    for name in _NAMES:
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        module.__path__ = []
        modules[name] = module
    modules["torchvision.transforms"].InterpolationMode = InterpolationMode
    modules["torchvision.transforms"].functional = modules["torchvision.transforms.functional"]
    modules["torchvision.transforms.functional"].InterpolationMode = InterpolationMode
    modules["torchvision"].transforms = modules["torchvision.transforms"]
    sys.modules.update(modules)
