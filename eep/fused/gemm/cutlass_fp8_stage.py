"""The FP8 expert stage: block-scaled FP8 grouped GEMMs (``csrc/gemm/fp8_gemm.cuh``) over the FP8 dispatch's
receive layout, called via ctypes like the bf16 stage (``cutlass_stage``), whose grouping, counts scan
and error word it shares.

Launches on the caller's torch stream, none of which waits for the host:

    1. setup          counts -> both GEMMs' problems, pointers, strides and scale pointers
    2. gather         token scales into compact [rows, hidden/128] form unless GEMM1 reads the dispatched
                      ones in place; with per-slot groups the e4m3 rows too
    3. GEMM1          h13 = x @ w13^T            e4m3 x e4m3, 1x128 x 128x128 block scales, bf16 out
    4. SwiGLU+quant   h = silu(gate) * up, requantised per token and 128 channels (e4m3 + float32 scales)
    5. GEMM2          out = h @ w2^T             the same GEMM, into the receive layout (or compact rows)
    6. scatter        per-slot groups only: compact rows into the receive layout

It reads the dispatch output directly: ``x`` is ``FusedReceive.x`` (float8_e4m3fn) and ``x_scale`` its
scales, either one per 128 channels ``[slots, ranks, max_tokens, hidden/128]`` (DeepEP's format; GEMM1
reads them in place with per-block groups) or one per row ``[slots, ranks, max_tokens]`` (the decode
buffer's format today; expanded to 128-channel blocks by the gather). The arithmetic, rounding points
included, is ``eep.reference.fp8.swiglu_fp8``.
"""

from __future__ import annotations

import ctypes

import torch

from eep.fp8 import BLOCK, FP8_DTYPE, Fp8Weight
from eep.fused.gemm.build import FP8_CONFIGS, GemmConfig
from eep.fused.gemm.cutlass_stage import PlanStage, StageLibrary, _StageShapeC, pick_grouping
from eep.fused.gemm.shape import ExpertStageShape


class _Fp8OperandsC(ctypes.Structure):
    _fields_ = [("xs_slot_stride", ctypes.c_int64), ("xs_src_stride", ctypes.c_int64),
                ("xs_row_stride", ctypes.c_int64), ("xs_col_stride", ctypes.c_int64), ("xs_in_place", ctypes.c_int),
                ("out_slot_stride", ctypes.c_int64), ("out_src_stride", ctypes.c_int64),
                ("out_row_stride", ctypes.c_int64), ("w13_scale_slot_stride", ctypes.c_int64),
                ("w2_scale_slot_stride", ctypes.c_int64)]


def pick_fp8_config(rows_per_group: float) -> GemmConfig:
    """FP8 kernel for groups of about ``rows_per_group`` rows: tokens on the N tile (swap) when a group
    holds few of them, as in the bf16 stage; the 128x128 tile otherwise."""
    if rows_per_group <= 32:
        return GemmConfig(128, 32, 128, "coop", swap=True, fp8=True)
    if rows_per_group <= 64:
        return GemmConfig(128, 64, 128, "coop", swap=True, fp8=True)
    # a 1x2 cluster: two N tiles of a group share each token tile (TMA multicast); at prefill it beat
    # the 1x1 cluster by 5-11% on 1 x H100 (perf/RESULTS.md "FP8 expert stage")
    return GemmConfig(128, 128, 128, "coop", fp8=True, cluster_n=2)


class CutlassFp8ExpertStage(PlanStage):
    """SwiGLU experts on FP8 tokens and block-scaled FP8 weights, over one rank's receive layout (CUDA, Hopper).

    Call ``stage(x, x_scale, count, w13, w2)``: x float8_e4m3fn ``[slots_per_rank, num_ranks,
    max_tokens_per_rank, hidden]`` with ``x_scale`` as in the module docstring; count ``[slots_per_rank,
    num_ranks]``; w13 an ``Fp8Weight`` ``[slots_per_rank, 2*inter, hidden]`` (gate rows, then up rows) with
    scales ``[slots_per_rank, 2*inter/128, hidden/128]``; w2 ``[slots_per_rank, hidden, inter]`` with
    ``[slots_per_rank, hidden/128, inter/128]``. Returns bf16 in the receive layout (a buffer this object
    owns, valid until its next call; rows past each block's count are not written). hidden and inter
    must be multiples of 128 (every FP8 release's are): gate and up then have scale blocks of their own.
    """

    def __init__(self, shape: ExpertStageShape, *, device: torch.device | str, gemm1: GemmConfig | None = None,
                 gemm2: GemmConfig | None = None, expected_rows_per_group: float | None = None,
                 grouping: str | None = None, configs: tuple[GemmConfig, ...] = FP8_CONFIGS):
        self.shape = shape
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"CutlassFp8ExpertStage needs a CUDA device, got {device}")
        if shape.hidden % BLOCK or shape.inter % BLOCK:
            raise ValueError(f"hidden={shape.hidden} and inter={shape.inter} must be multiples of {BLOCK} for the "
                             "FP8 stage (one scale per 128 channels, gate and up blocks apart)")
        rows = expected_rows_per_group if expected_rows_per_group is not None else shape.max_tokens_per_rank
        self.grouping = grouping or pick_grouping(rows)
        if self.grouping not in ("block", "slot"):
            raise ValueError(f"grouping={self.grouping!r}, expected 'block' or 'slot'")
        rows_per_gemm_group = rows * shape.num_ranks if self.grouping == "slot" else rows
        self.gemm1 = gemm1 or pick_fp8_config(rows_per_gemm_group)
        self.gemm2 = gemm2 or pick_fp8_config(rows_per_gemm_group)
        for config in (self.gemm1, self.gemm2):
            if not config.fp8:
                raise ValueError(f"{config.name} is not an FP8 config")
        self._launch = StageLibrary(configs, (self.gemm1, self.gemm2), device)
        self._lib = self._launch.lib
        self._declare()
        self.device = self._launch.device
        s, dev, cap = shape, self.device, shape.capacity_rows
        self.h13 = torch.empty(cap, 2 * s.inter, dtype=torch.bfloat16, device=dev)
        self.hq = torch.empty(cap, s.inter, dtype=FP8_DTYPE, device=dev)
        self.hs = torch.empty(cap, s.inter // BLOCK, dtype=torch.float32, device=dev)
        self.xs = torch.empty(cap, s.hidden // BLOCK, dtype=torch.float32, device=dev)  # compact token scales
        self.out_buffer = torch.empty(s.slots_per_rank, s.num_ranks, s.max_tokens_per_rank, s.hidden,
                                      dtype=torch.bfloat16, device=dev)
        self.plan = torch.zeros(int(self._lib.eep_fp8_stage_plan_nbytes(s.num_groups)), dtype=torch.uint8, device=dev)
        if self.grouping == "slot":
            self.xc = torch.empty(cap, s.hidden, dtype=FP8_DTYPE, device=dev)
            self.yc = torch.empty(cap, s.hidden, dtype=torch.bfloat16, device=dev)
        else:
            self.xc = self.yc = None
        self._gemm_groups = s.slots_per_rank if self.grouping == "slot" else s.num_groups
        self.workspace = self._launch.workspace((self.gemm1, self.gemm2), self._gemm_groups)
        self._total_rows_offset = int(self._lib.eep_fp8_stage_total_rows_offset(s.num_groups))
        self._gemm_offset = self._lib.eep_fp8_stage_plan_gemm_offset
        self.scales_in_place = False  # set by setup: GEMM1 read the dispatched scales where they were

    def _declare(self) -> None:
        p, i, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
        shape_p, ops_p = ctypes.POINTER(_StageShapeC), ctypes.POINTER(_Fp8OperandsC)
        self._launch.declare("eep_fp8_stage_plan_nbytes", sz, [i])
        self._launch.declare("eep_fp8_stage_plan_gemm_offset", sz, [i, i])
        self._launch.declare("eep_fp8_stage_total_rows_offset", sz, [i])
        self._launch.declare("eep_fp8_stage_setup", i, [p, shape_p, ops_p, p, p, p, p, p, p, p, p, p, p, p, p, i, i, i,
                                                        p, p, p, p, sz])
        self._launch.declare("eep_fp8_gather", i, [p, p, p, p, p, shape_p, ops_p, i, i, p, p, sz])
        self._launch.declare("eep_fp8_swiglu_quant", i, [p, p, p, p, i, i, i, i, p, p, sz])
        self._launch.declare("eep_fp8_scatter", i, [p, p, p, shape_p, ops_p, p, p, sz])

    # ---- inputs ----
    def check(self, x: torch.Tensor, x_scale: torch.Tensor, count: torch.Tensor, w13: Fp8Weight, w2: Fp8Weight) -> None:
        """``ValueError`` naming the input that does not fit this stage."""
        s = self.shape
        kb, kb_inter = s.hidden // BLOCK, s.inter // BLOCK
        layout = (s.slots_per_rank, s.num_ranks, s.max_tokens_per_rank)
        if x.dtype != FP8_DTYPE or tuple(x.shape) != (*layout, s.hidden) or x.device != self.device:
            raise ValueError(f"FP8 expert stage: x is {x.dtype} {tuple(x.shape)} on {x.device}, expected float8_e4m3fn "
                             f"{(*layout, s.hidden)} on {self.device}")
        if x.stride(3) != 1 or any(x.stride(d) % 16 for d in range(3)) or x.data_ptr() % 16:
            raise ValueError(f"FP8 expert stage: x strides {x.stride()} must give contiguous, 16-byte aligned rows")
        if x_scale.dtype != torch.float32 or x_scale.device != self.device or \
                tuple(x_scale.shape) not in (layout, (*layout, kb)):
            raise ValueError(f"FP8 expert stage: x_scale is {x_scale.dtype} {tuple(x_scale.shape)}, expected float32 "
                             f"{(*layout, kb)} (per 128 channels) or {layout} (per row)")
        if tuple(count.shape) != (s.slots_per_rank, s.num_ranks) or count.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"FP8 expert stage: count is {count.dtype} {tuple(count.shape)}, expected int32 "
                             f"{(s.slots_per_rank, s.num_ranks)}")
        want = {"w13": (w13, (s.slots_per_rank, 2 * s.inter, s.hidden), (s.slots_per_rank, 2 * kb_inter, kb)),
                "w2": (w2, (s.slots_per_rank, s.hidden, s.inter), (s.slots_per_rank, kb, kb_inter))}
        for name, (w, weight_shape, scale_shape) in want.items():
            if not isinstance(w, Fp8Weight):
                raise ValueError(f"FP8 expert stage: {name} must be an Fp8Weight (e4m3 weights + block scales)")
            if w.weight.dtype != FP8_DTYPE or tuple(w.weight.shape) != weight_shape or \
                    w.scale.dtype != torch.float32 or tuple(w.scale.shape) != scale_shape:
                raise ValueError(f"FP8 expert stage: {name} is {w.weight.dtype} {tuple(w.weight.shape)} with "
                                 f"{w.scale.dtype} scales {tuple(w.scale.shape)}, expected float8_e4m3fn {weight_shape} "
                                 f"with float32 {scale_shape}")
            if w.device != self.device or w.scale.device != self.device:
                raise ValueError(f"FP8 expert stage: {name} is on {w.device}, expected {self.device}")
            if w.weight.stride()[1:] != (weight_shape[2], 1) or w.weight.data_ptr() % 16 or \
                    w.weight.stride(0) % 16 or w.scale.stride()[1:] != (scale_shape[2], 1):
                raise ValueError(f"FP8 expert stage: {name} slots must be contiguous row-major matrices (weight "
                                 f"strides {w.weight.stride()}, scale strides {w.scale.stride()})")

    # ---- the launches, public so the benchmark can time each ----
    def setup(self, x: torch.Tensor, x_scale: torch.Tensor, count: torch.Tensor, w13: Fp8Weight, w2: Fp8Weight) -> None:
        self.check(x, x_scale, count, w13, w2)
        s = self.shape
        kb = s.hidden // BLOCK
        count = count if count.dtype == torch.int32 and count.is_contiguous() else count.to(torch.int32).contiguous()
        per_row = x_scale.dim() == 3
        self.scales_in_place = (self.grouping == "block" and not per_row and x_scale.stride(3) == 1
                                and x_scale.stride(2) == kb)
        xs_strides = (*x_scale.stride()[:3], 0) if per_row else x_scale.stride()
        out = self.out_buffer
        self._operands = _Fp8OperandsC(*xs_strides, int(self.scales_in_place), *out.stride()[:3],
                                       w13.scale.stride(0), w2.scale.stride(0))
        self._shape_c = _StageShapeC(s.slots_per_rank, s.num_ranks, s.max_tokens_per_rank, s.hidden, s.inter,
                                     s.capacity_rows, x.stride(0), x.stride(1), x.stride(2), w13.weight.stride(0),
                                     w2.weight.stride(0))
        self._inputs = (x, x_scale, count, w13, w2)  # kernels read them asynchronously
        launch = self._launch
        rc = self._lib.eep_fp8_stage_setup(
            count.data_ptr(), ctypes.byref(self._shape_c), ctypes.byref(self._operands), x.data_ptr(),
            x_scale.data_ptr(), w13.weight.data_ptr(), w13.scale.data_ptr(), w2.weight.data_ptr(), w2.scale.data_ptr(),
            self.h13.data_ptr(), self.hq.data_ptr(), self.hs.data_ptr(), self.xs.data_ptr(), out.data_ptr(),
            self.plan.data_ptr(), int(self.gemm1.swap), int(self.gemm2.swap), int(self.grouping == "slot"),
            _ptr(self.xc), _ptr(self.yc), launch.stream(), launch.err, len(launch.err))
        launch.check(rc, "eep_fp8_stage_setup")

    def gather(self) -> None:
        """Token scales (unless read in place) and, with per-slot groups, e4m3 rows into compact form."""
        x, x_scale = self._inputs[:2]
        rows = self.grouping == "slot"
        if not rows and self.scales_in_place:
            return
        launch = self._launch
        rc = self._lib.eep_fp8_gather(x.data_ptr(), x_scale.data_ptr(), _ptr(self.xc), self.xs.data_ptr(),
                                      self.plan.data_ptr(), ctypes.byref(self._shape_c), ctypes.byref(self._operands),
                                      int(rows), int(not self.scales_in_place), launch.stream(), launch.err,
                                      len(launch.err))
        launch.check(rc, "eep_fp8_gather")

    def swiglu_quant(self) -> None:
        s, launch = self.shape, self._launch
        rc = self._lib.eep_fp8_swiglu_quant(self.h13.data_ptr(), self.hq.data_ptr(), self.hs.data_ptr(),
                                            self.plan.data_ptr(), s.num_groups, s.capacity_rows, s.inter,
                                            launch.sm_count, launch.stream(), launch.err, len(launch.err))
        launch.check(rc, "eep_fp8_swiglu_quant")

    def scatter(self) -> None:
        launch = self._launch
        rc = self._lib.eep_fp8_scatter(self.out_buffer.data_ptr(), self.yc.data_ptr(), self.plan.data_ptr(),
                                       ctypes.byref(self._shape_c), ctypes.byref(self._operands), launch.stream(),
                                       launch.err, len(launch.err))
        launch.check(rc, "eep_fp8_scatter")

    def __call__(self, x: torch.Tensor, x_scale: torch.Tensor, count: torch.Tensor, w13: Fp8Weight,
                 w2: Fp8Weight) -> torch.Tensor:
        self.setup(x, x_scale, count, w13, w2)
        self.gather()
        self.run_gemm(1)
        self.swiglu_quant()
        self.run_gemm(2)
        if self.grouping == "slot":
            self.scatter()
        return self.out_buffer


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()
