"""GPU differential checks of the expert stage (tests/gpu/gemm_check.py) under pytest; skipped without CUDA."""

import importlib.util
from pathlib import Path

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_gemm_checks_pass():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from eep.fused.gemm.build import GemmBuildError, cutlass_root, find_nvcc
    try:
        cutlass_root(), find_nvcc()
    except GemmBuildError as exc:  # the headers travel with the run (tests/gpu/run_gemm.sh says how)
        pytest.skip(str(exc))
    path = Path(__file__).parent / "gpu" / "gemm_check.py"
    spec = importlib.util.spec_from_file_location("gemm_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main() == 0, module.FAILURES
