"""The expert stage through the CUTLASS SM90 grouped GEMMs (``eep/fused/csrc/gemm``), called via ctypes.

Launches on the caller's torch stream, none of which waits for the host. With ``grouping="block"``:

    1. setup   counts -> per-(slot, source) problem sizes, pointers, strides; compact row offsets
    2. GEMM1   h13[rows of block] = x[block] @ w13[slot]^T     (reads the receive layout in place)
    3. SwiGLU  h = silu(h13[:, :I]) * h13[:, I:]               (separate kernel, see docs/expert_gemm.md)
    4. GEMM2   out[block] = h[rows of block] @ w2[slot]^T      (writes the receive layout in place)

With ``grouping="slot"`` the GEMMs have one group per slot over compact rows, so each slot's
weights are read once rather than once per source block; a gather of x before GEMM1 and a scatter
into the receive layout after GEMM2 pay for it (cheap at decode, where weights dominate the bytes).

Weights are read through per-slot pointers computed at launch from the base pointer of the
caller's tensors, so a repair that copies new weights into a slot in place needs no change here.

``fused_swiglu=True`` (opt-in, off by default) replaces steps 2-3 with one GEMM1 whose epilogue
computes ``silu(gate) * up`` and writes h directly (``csrc/gemm/swiglu_gemm.cuh``), after a tiny
launch that points GEMM1's plan at h. That GEMM expects w13 with gate and up rows interleaved
(``interleave_gate_up``, period ``stage.pair_rows``): the caller passes the interleaved weights, and a
repair writing a slot must write that slot's interleaved rows (``interleave_gate_up(w13[slot:slot+1])``).
"""

from __future__ import annotations

import ctypes
import dataclasses

import torch

from eep.errors import EEPError
from eep.fused.gemm.build import DEFAULT_CONFIGS, SWIGLU_CONFIGS, GemmConfig, load_library
from eep.fused.gemm.shape import ExpertStageShape

_ERR_LEN = 512
ERROR_COUNT_OVER_CAPACITY = 1  # a count outside [0, max_tokens_per_rank]: clamped
ERROR_ROWS_OVER_CAPACITY = 2   # more rows than capacity_rows: the overflowing blocks were skipped


class GemmLaunchError(EEPError):
    """A CUTLASS or CUDA launch of the expert stage failed; the message carries the library's text."""


class _StageShapeC(ctypes.Structure):
    _fields_ = [("slots_per_rank", ctypes.c_int), ("num_ranks", ctypes.c_int), ("max_tokens_per_rank", ctypes.c_int),
                ("hidden", ctypes.c_int), ("inter", ctypes.c_int), ("capacity_rows", ctypes.c_int),
                ("x_slot_stride", ctypes.c_int64), ("x_src_stride", ctypes.c_int64), ("x_row_stride", ctypes.c_int64),
                ("w13_slot_stride", ctypes.c_int64), ("w2_slot_stride", ctypes.c_int64)]


def pick_grouping(rows_per_block: float) -> str:
    """``"slot"`` unless blocks are large: measured on H100 (perf/RESULTS.md), per-slot groups won at
    4, 8 and 128 rows per block (weights read once, less tile padding) and per-block groups at 256
    (the gather and scatter then cost more than the padding)."""
    return "slot" if rows_per_block < 192 else "block"


def pick_config(rows_per_group: float) -> GemmConfig:
    """Default kernel for a GEMM whose groups hold about ``rows_per_group`` rows.

    A decode block holds a handful of tokens: put them on the N tile (swap) so that a 128-row M
    tile is not mostly padding; prefill blocks hold hundreds of rows: the plain cooperative tile.
    """
    if rows_per_group <= 32:
        return GemmConfig(128, 32, 128, "coop", swap=True)
    return GemmConfig(128, 256, 64, "coop")  # beat 128x128 at every prefill shape measured


def swiglu_twin(config: GemmConfig) -> GemmConfig:
    """The same GEMM1 kernel with SwiGLU in its epilogue (what ``fused_swiglu`` stages pick)."""
    return dataclasses.replace(config, swiglu=True)


def swiglu_pair_rows(config: GemmConfig) -> int:
    """Interleave period of w13 for a SwiGLU GEMM1: the wgmma accumulator gives one thread the column
    pair (n, n+1) (not swapped: weight rows on N -> period 1) or the rows (r, r+8) (swapped: weight rows
    on M -> period 8) -- see swiglu_gemm.cuh."""
    return 8 if config.swap else 1


def interleave_gate_up(w13: torch.Tensor, pair_rows: int) -> torch.Tensor:
    """w13 ``[slots, 2*inter, hidden]`` (gate rows then up rows) -> a new tensor of the same shape whose
    rows alternate ``pair_rows`` gate rows and ``pair_rows`` up rows: row ``2*p*b + t`` is gate
    ``p*b + t`` and row ``2*p*b + p + t`` is up ``p*b + t`` (``t < p``).

    With ``pair_rows == 1`` the gate and up halves of the result are strided views
    (``result.view(slots, inter, 2, hidden)[:, :, 0]``), so a repair can still copy into them in place.
    """
    slots, two_i, hidden = w13.shape
    inter = two_i // 2
    if two_i % 2 or inter % pair_rows:
        raise ValueError(f"interleave_gate_up: w13 {tuple(w13.shape)} has 2*inter rows not divisible into "
                         f"pairs of {pair_rows}")
    return (w13.reshape(slots, 2, inter // pair_rows, pair_rows, hidden).transpose(1, 2)
            .reshape(slots, two_i, hidden).contiguous())


def deinterleave_gate_up(w13i: torch.Tensor, pair_rows: int) -> torch.Tensor:
    """Inverse of ``interleave_gate_up``."""
    slots, two_i, hidden = w13i.shape
    inter = two_i // 2
    return (w13i.reshape(slots, inter // pair_rows, 2, pair_rows, hidden).transpose(1, 2)
            .reshape(slots, two_i, hidden).contiguous())


class StageLibrary:
    """A CUTLASS stage's loaded library on one device, and what every launch of it needs: the GEMM entry
    points of ``gemms``, the caller's stream, an error buffer, and a check that turns a non-zero
    return into ``GemmLaunchError`` with the library's message. Shared by the bf16 and FP8 stages."""

    def __init__(self, configs: tuple[GemmConfig, ...], gemms: tuple[GemmConfig, ...], device: torch.device):
        for config in gemms:
            if config not in configs:
                raise ValueError(f"{config.name} is not among the compiled configs {[c.name for c in configs]}")
        self.lib = load_library(configs)
        p, i, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
        for c in gemms:
            ws = getattr(self.lib, f"{c.name}_workspace")
            ws.restype, ws.argtypes = sz, [i, i, i]
            run = getattr(self.lib, f"{c.name}_run")
            run.restype, run.argtypes = i, [i, p, p, i, i, p, p, sz]
        index = device.index if device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", index)  # "cuda" and "cuda:0" must compare equal
        self.device_index = index
        self.sm_count = torch.cuda.get_device_properties(index).multi_processor_count
        self.err = ctypes.create_string_buffer(_ERR_LEN)

    def declare(self, name: str, restype, argtypes: list) -> None:
        fn = getattr(self.lib, name)
        fn.restype, fn.argtypes = restype, argtypes

    def check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise GemmLaunchError(f"{what} failed (code {rc}): {self.err.value.decode(errors='replace')}")

    def stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream

    def workspace(self, gemms: tuple[GemmConfig, ...], num_groups: int) -> torch.Tensor:
        nbytes = max(int(getattr(self.lib, f"{c.name}_workspace")(num_groups, self.device_index, self.sm_count))
                     for c in gemms)
        return torch.empty(max(nbytes, 16), dtype=torch.uint8, device=self.device)

    def run_gemm(self, config: GemmConfig, num_groups: int, plan_ptr: int, workspace: torch.Tensor, what: str) -> None:
        rc = getattr(self.lib, f"{config.name}_run")(num_groups, plan_ptr, workspace.data_ptr(), self.device_index,
                                                     self.sm_count, self.stream(), self.err, _ERR_LEN)
        self.check(rc, f"{what} ({config.name})")

    def read_int32(self, plan: torch.Tensor, offset: int) -> int:
        """One int32 of a device plan (syncs the stream)."""
        return int(plan[offset:offset + 4].view(torch.int32).item())


class PlanStage:
    """What both CUTLASS stages share once their buffers exist: the GEMM launches from the device plan
    and the plan's readouts. A subclass sets ``_launch``, ``plan``, ``workspace``, ``gemm1``, ``gemm2``,
    ``grouping``, ``_gemm_groups``, ``_total_rows_offset`` and ``_gemm_offset(groups, which)``."""

    def run_gemm(self, which: int) -> None:
        groups = self._gemm_groups
        plan = self.plan.data_ptr() + int(self._gemm_offset(groups, which))
        self._launch.run_gemm(self.gemm1 if which == 1 else self.gemm2, groups, plan, self.workspace, f"GEMM{which}")

    def error_flags(self) -> int:
        """The device error word of the last setup (``ERROR_*`` bits); reading it syncs the stream."""
        return self._launch.read_int32(self.plan, self._total_rows_offset + 4)

    def total_rows(self) -> int:
        return self._launch.read_int32(self.plan, self._total_rows_offset)

    def describe(self) -> str:
        return f"{self.grouping}:{self.gemm1.name}|{self.gemm2.name}"  # the names say swiglu / fp8 kernels


class CutlassExpertStage(PlanStage):
    """SwiGLU experts over one rank's receive layout with CUTLASS grouped GEMMs (same call as
    ``TorchExpertStage``; CUDA, bf16 only).

    ``gemm1``/``gemm2`` choose the kernels (``pick_config`` from ``expected_rows_per_group`` when
    None); they must be among ``configs``, the set compiled into the library.

    ``fused_swiglu=True``: GEMM1 is a ``swiglu`` config (the SwiGLU twin of ``pick_config``'s choice
    when ``gemm1`` is None), ``configs`` defaults to ``DEFAULT_CONFIGS + SWIGLU_CONFIGS`` (a separate
    cached library), and the call expects ``w13`` interleaved: ``stage.prepare_w13(w13)``.
    """

    def __init__(self, shape: ExpertStageShape, *, device: torch.device | str, gemm1: GemmConfig | None = None,
                 gemm2: GemmConfig | None = None, expected_rows_per_group: float | None = None,
                 grouping: str | None = None, configs: tuple[GemmConfig, ...] | None = None,
                 fused_swiglu: bool = False):
        self.shape = shape
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"CutlassExpertStage needs a CUDA device, got {self.device}")
        if shape.hidden % 8 or shape.inter % 8:
            raise ValueError(f"hidden={shape.hidden} and inter={shape.inter} must be multiples of 8 (16-byte TMA rows)")
        rows = expected_rows_per_group if expected_rows_per_group is not None else shape.max_tokens_per_rank
        self.grouping = grouping or pick_grouping(rows)
        if self.grouping not in ("block", "slot"):
            raise ValueError(f"grouping={self.grouping!r}, expected 'block' or 'slot'")
        rows_per_gemm_group = rows * shape.num_ranks if self.grouping == "slot" else rows
        self.fused_swiglu = fused_swiglu
        if configs is None:
            configs = DEFAULT_CONFIGS + SWIGLU_CONFIGS if fused_swiglu else DEFAULT_CONFIGS
        if gemm1 is None:
            gemm1 = pick_config(rows_per_gemm_group)
            if fused_swiglu:
                gemm1 = swiglu_twin(gemm1)
        if gemm1.swiglu != fused_swiglu:
            raise ValueError(f"gemm1={gemm1.name}: a swiglu GEMM1 goes with fused_swiglu=True and only then")
        if gemm2 is not None and gemm2.swiglu:
            raise ValueError(f"gemm2={gemm2.name} cannot be a swiglu config")
        self.gemm1 = gemm1
        self.gemm2 = gemm2 or pick_config(rows_per_gemm_group)
        self.pair_rows = swiglu_pair_rows(self.gemm1) if fused_swiglu else 0
        self._launch = StageLibrary(configs, (self.gemm1, self.gemm2), self.device)
        self._lib = self._launch.lib
        self._declare(self._launch, fused_swiglu)
        self.device = self._launch.device
        groups = shape.num_groups
        dtype = torch.bfloat16
        # Fused SwiGLU never writes h13, but the setup kernel still derives GEMM1's D pointers from it
        # (the patch launch maps them onto h): a zero-size placeholder would alias, so keep the base
        # pointer of a real allocation of one row.
        h13_rows = 1 if fused_swiglu else shape.capacity_rows
        self.h13 = torch.empty(h13_rows, 2 * shape.inter, dtype=dtype, device=self.device)
        self.h = torch.empty(shape.capacity_rows, shape.inter, dtype=dtype, device=self.device)
        self.out_buffer = torch.empty(shape.slots_per_rank, shape.num_ranks, shape.max_tokens_per_rank, shape.hidden,
                                      dtype=dtype, device=self.device)
        self.plan = torch.zeros(int(self._lib.eep_stage_plan_nbytes(groups)), dtype=torch.uint8, device=self.device)
        if self.grouping == "slot":  # compact copies of x and of GEMM2's output
            self.xc = torch.empty(shape.capacity_rows, shape.hidden, dtype=dtype, device=self.device)
            self.yc = torch.empty(shape.capacity_rows, shape.hidden, dtype=dtype, device=self.device)
        else:
            self.xc = self.yc = None
        self._gemm_groups = shape.slots_per_rank if self.grouping == "slot" else groups
        self.workspace = self._launch.workspace((self.gemm1, self.gemm2), self._gemm_groups)
        self._err = self._launch.err
        self._check = self._launch.check
        self._stream = self._launch.stream
        self._total_rows_offset = int(self._lib.eep_stage_total_rows_offset(groups))
        self._gemm_offset = self._lib.eep_stage_plan_gemm_offset

    @staticmethod
    def _declare(launch: StageLibrary, fused_swiglu: bool) -> None:
        p, i, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
        launch.declare("eep_stage_plan_nbytes", sz, [i])
        launch.declare("eep_stage_plan_gemm_offset", sz, [i, i])
        launch.declare("eep_stage_total_rows_offset", sz, [i])
        launch.declare("eep_stage_setup", i, [p, ctypes.POINTER(_StageShapeC), p, p, p, p, p, p, p, i, i, i, p, p, p,
                                              p, sz])
        launch.declare("eep_copy_rows", i, [p, p, p, ctypes.POINTER(_StageShapeC), i, p, p, sz])
        launch.declare("eep_swiglu", i, [p, p, p, i, i, i, i, p, p, sz])
        if fused_swiglu:
            launch.declare("eep_swiglu_plan_patch", i, [p, i, p, p, p, p, sz])

    # ---- the four launches, public so the benchmark can time each ----
    def setup(self, x: torch.Tensor, count: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> None:
        s = self.shape
        s.check(x, count, w13, w2)
        if x.dtype != torch.bfloat16 or x.device != self.device:
            raise ValueError(f"expert stage: x is {x.dtype} on {x.device}, expected bfloat16 on {self.device}")
        if x.stride(3) != 1 or x.stride(2) % 8 or x.stride(1) % 8 or x.stride(0) % 8 or x.data_ptr() % 16:
            raise ValueError(f"expert stage: x strides {x.stride()} must have contiguous, 16-byte aligned rows")
        if x.stride() != self.out_buffer.stride():
            # the output reuses x's block offsets: keep the two layouts identical
            raise ValueError(f"expert stage: x strides {x.stride()} differ from the output's {self.out_buffer.stride()}")
        for name, w in (("w13", w13), ("w2", w2)):
            if w.stride(2) != 1 or w.stride(1) != w.shape[2] or w.data_ptr() % 16:
                raise ValueError(f"expert stage: {name} slots must be contiguous row-major matrices, strides {w.stride()}")
        count = count if count.dtype == torch.int32 and count.is_contiguous() else count.to(torch.int32).contiguous()
        self._keep = (count,)  # the setup kernel reads it asynchronously
        shape_c = _StageShapeC(s.slots_per_rank, s.num_ranks, s.max_tokens_per_rank, s.hidden, s.inter, s.capacity_rows,
                               x.stride(0), x.stride(1), x.stride(2), w13.stride(0), w2.stride(0))
        self._shape_c = shape_c
        rc = self._lib.eep_stage_setup(count.data_ptr(), ctypes.byref(shape_c), x.data_ptr(), w13.data_ptr(),
                                       w2.data_ptr(), self.h13.data_ptr(), self.h.data_ptr(), self.out_buffer.data_ptr(),
                                       self.plan.data_ptr(), int(self.gemm1.swap), int(self.gemm2.swap),
                                       int(self.grouping == "slot"), _ptr(self.xc), _ptr(self.yc),
                                       self._stream(), self._err, _ERR_LEN)
        self._check(rc, "eep_stage_setup")
        if self.fused_swiglu:  # GEMM1 writes h [rows, I], not h13 [rows, 2I]
            rc = self._lib.eep_swiglu_plan_patch(self.plan.data_ptr(), self._gemm_groups, self.h13.data_ptr(),
                                                 self.h.data_ptr(), self._stream(), self._err, _ERR_LEN)
            self._check(rc, "eep_swiglu_plan_patch")

    def prepare_w13(self, w13: torch.Tensor) -> torch.Tensor:
        """The w13 this stage's call expects: ``w13`` itself, or with ``fused_swiglu`` a new interleaved
        copy (``interleave_gate_up(w13, self.pair_rows)``; keep it, and repair slots into it)."""
        return interleave_gate_up(w13, self.pair_rows) if self.fused_swiglu else w13

    def copy_rows(self, layout: torch.Tensor, *, to_compact: bool) -> None:
        """Per-slot grouping: gather ``layout``'s kept rows into ``xc`` / scatter ``yc`` into ``layout``."""
        compact = self.xc if to_compact else self.yc
        rc = self._lib.eep_copy_rows(layout.data_ptr(), compact.data_ptr(), self.plan.data_ptr(),
                                     ctypes.byref(self._shape_c), int(to_compact), self._stream(), self._err, _ERR_LEN)
        self._check(rc, "eep_copy_rows")

    def swiglu(self) -> None:
        s = self.shape
        rc = self._lib.eep_swiglu(self.h13.data_ptr(), self.h.data_ptr(), self.plan.data_ptr(), s.num_groups,
                                  s.capacity_rows, s.inter, self._launch.sm_count, self._stream(), self._err, _ERR_LEN)
        self._check(rc, "eep_swiglu")

    def __call__(self, x: torch.Tensor, count: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        self.setup(x, count, w13, w2)
        if self.grouping == "slot":
            self.copy_rows(x, to_compact=True)
        self.run_gemm(1)
        if not self.fused_swiglu:
            self.swiglu()
        self.run_gemm(2)
        if self.grouping == "slot":
            self.copy_rows(self.out_buffer, to_compact=False)
        return self.out_buffer


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()
