"""GPU differential checks of the expert stage (tests/gpu/gemm_check.py) under pytest; skipped without CUDA."""

import importlib.util
from pathlib import Path

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_gemm_checks_pass():
    path = Path(__file__).parent / "gpu" / "gemm_check.py"
    spec = importlib.util.spec_from_file_location("gemm_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main() == 0, module.FAILURES
