"""Expert compute of the fused data plane: SwiGLU experts over one rank's dispatch receive layout.

Two backends with one call, ``stage(x, count, w13, w2) -> out`` (all in the receive layout):

- ``CutlassExpertStage``: CUTLASS SM90 pointer-array grouped GEMMs built with nvcc (Hopper, bf16);
- ``TorchExpertStage``: ``torch._grouped_mm`` (or a per-group matmul loop where it does not run).

Block-scaled FP8 experts (``dtype=torch.float8_e4m3fn``; weights are ``eep.fp8.Fp8Weight``) take the
FP8 dispatch's scales too, ``stage(x, x_scale, count, w13, w2) -> out`` (bf16):

- ``CutlassFp8ExpertStage``: CUTLASS SM90 blockwise-scaled FP8 grouped GEMMs (``cutlass_fp8_stage``);
- ``TorchFp8ExpertStage``: the same arithmetic in torch ops, slot by slot.

``make_expert_stage`` picks one (``EEP_EXPERT_BACKEND`` or the ``backend`` argument). Design and
measurements: ``docs/expert_gemm.md``. Importing this package imports no CUDA package and builds nothing.
"""

from __future__ import annotations

import logging

import torch

from eep import envs
from eep.fused.gemm.shape import ExpertStageShape
from eep.fused.gemm.torch_stage import (TorchExpertStage, TorchFp8ExpertStage, grouped_mm, grouped_mm_loop,
                                        has_torch_grouped_mm)

BACKENDS = ("auto", "cutlass", "grouped_mm", "loop")
_log = logging.getLogger(__name__)


def make_expert_stage(shape: ExpertStageShape, *, device: torch.device | str, dtype: torch.dtype = torch.bfloat16,
                      backend: str | None = None, expected_rows_per_group: float | None = None):
    """The expert stage for ``shape`` on ``device``.

    backend: ``"cutlass"``, ``"grouped_mm"`` (``torch._grouped_mm``), ``"loop"`` (per-group matmuls,
    any device and dtype) or ``"auto"``; None reads ``EEP_EXPERT_BACKEND``. ``"auto"`` takes CUTLASS
    on Hopper with bf16 (faster than ``torch._grouped_mm`` at every benchmark shape, perf/RESULTS.md)
    when the library is built or can be built (nvcc and headers present), else ``torch._grouped_mm``
    where it runs, else the loop.

    ``dtype=torch.float8_e4m3fn``: the FP8 stages; ``"cutlass"`` (or ``"auto"`` on Hopper) is
    ``CutlassFp8ExpertStage``, anything else ``TorchFp8ExpertStage``.
    """
    backend = backend or envs.expert_backend()
    if backend not in BACKENDS:
        raise ValueError(f"expert backend {backend!r} is not one of {BACKENDS} (EEP_EXPERT_BACKEND)")
    device = torch.device(device)
    if dtype == torch.float8_e4m3fn:
        return _make_fp8_stage(shape, device, backend, expected_rows_per_group)
    if backend == "auto":
        if device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) == (9, 0):
            from eep.fused.gemm.build import GemmBuildError
            try:
                return make_expert_stage(shape, device=device, dtype=dtype, backend="cutlass",
                                         expected_rows_per_group=expected_rows_per_group)
            except GemmBuildError as exc:
                _log.warning("CUTLASS expert stage unavailable (%s); using torch._grouped_mm", exc)
        backend = "grouped_mm" if has_torch_grouped_mm(device, dtype) else "loop"
    if backend == "cutlass":
        from eep.fused.gemm.cutlass_stage import CutlassExpertStage  # builds/loads the nvcc library
        return CutlassExpertStage(shape, device=device, expected_rows_per_group=expected_rows_per_group)
    return TorchExpertStage(shape, device=device, dtype=dtype, use_torch_grouped_mm=backend == "grouped_mm")


def _make_fp8_stage(shape: ExpertStageShape, device: torch.device, backend: str,
                    expected_rows_per_group: float | None):
    if backend == "auto" and device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0):
        from eep.fused.gemm.build import GemmBuildError
        try:
            return _make_fp8_stage(shape, device, "cutlass", expected_rows_per_group)
        except GemmBuildError as exc:
            _log.warning("CUTLASS FP8 expert stage unavailable (%s); using the torch FP8 stage", exc)
    if backend == "cutlass":
        from eep.fused.gemm.cutlass_fp8_stage import CutlassFp8ExpertStage  # builds/loads the nvcc library
        return CutlassFp8ExpertStage(shape, device=device, expected_rows_per_group=expected_rows_per_group)
    return TorchFp8ExpertStage(shape, device=device)


__all__ = ["BACKENDS", "ExpertStageShape", "TorchExpertStage", "TorchFp8ExpertStage", "grouped_mm", "grouped_mm_loop",
           "has_torch_grouped_mm", "make_expert_stage"]
