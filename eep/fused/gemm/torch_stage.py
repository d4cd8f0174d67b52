"""The expert stage through ``torch._grouped_mm``: the fallback path and the benchmark baseline.

    receive layout --gather--> compact rows (slot-major) --grouped_mm(w13)--> [rows, 2*inter]
      --silu(gate)*up--> [rows, inter] --grouped_mm(w2)--> [rows, hidden] --scatter--> receive layout

One group per local slot over the compacted rows (the slot's blocks from every source rank, in
source order). By default the gather index comes from ``nonzero_static`` with a fixed size
(``capacity_rows``), so no step syncs with the host and the whole stage can be captured in a CUDA
graph; rows past the live total are fillers that read some row and write into a spare row of the
output buffer. That costs work on the filler rows (capacity is ``top_k / slots``-times the rows a
uniform routing delivers); ``exact_rows=True`` instead syncs once on the row count, as an eager
implementation would, and touches only live rows (the fairer speed baseline).

``grouped_mm`` picks ``torch._grouped_mm`` where it runs (CUDA bf16 on sm90+, and the CPU build of
recent torch) and otherwise a per-group matmul loop with the same interface, kept readable because
it is what the CPU tests check the logic with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from eep.fused.gemm.shape import ExpertStageShape


def grouped_mm_loop(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``torch._grouped_mm`` semantics, one matmul per group (syncs on ``offs``).

    Parameters:
        a: ``[num_rows, k]``; b: ``[num_groups, k, n]``; offs: ``[num_groups]`` int32 cumulative row ends.
    Returns:
        ``[num_rows, n]``; rows past ``offs[-1]`` are zero.
    """
    out = torch.zeros(a.shape[0], b.shape[2], dtype=a.dtype, device=a.device)
    start = 0
    for group, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = (a[start:end].float() @ b[group].float()).to(a.dtype)
        start = end
    return out


def has_torch_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs for this device and dtype (bf16, CPU or CUDA sm90+)."""
    if not hasattr(torch, "_grouped_mm") or dtype != torch.bfloat16:
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (9, 0)
    return device.type == "cpu"


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, *, use_torch: bool = True) -> torch.Tensor:
    """``a [num_rows, k] @ b[g] [k, n]`` for the rows of each group ``g`` (see ``grouped_mm_loop``)."""
    if use_torch and has_torch_grouped_mm(a.device, a.dtype):
        return torch._grouped_mm(a, b, offs=offs)
    return grouped_mm_loop(a, b, offs)


class TorchExpertStage:
    """SwiGLU experts over one rank's receive layout, through ``grouped_mm``.

    Call ``stage(x, count, w13, w2)`` with x ``[slots_per_rank, num_ranks, max_tokens_per_rank, hidden]``,
    count ``[slots_per_rank, num_ranks]``, w13 ``[slots_per_rank, 2*inter, hidden]`` (gate rows, then
    up rows) and w2 ``[slots_per_rank, hidden, inter]``. Returns the output in the receive layout: a
    view of a buffer this object owns, valid until its next call; rows past each block's count are
    not written.
    """

    def __init__(self, shape: ExpertStageShape, *, device: torch.device | str, dtype: torch.dtype = torch.bfloat16,
                 use_torch_grouped_mm: bool = True, exact_rows: bool = False):
        self.shape = shape
        self.exact_rows = exact_rows
        self.device = torch.device(device)
        self.use_torch_grouped_mm = use_torch_grouped_mm
        # One spare row at the end takes the fillers' writes.
        self._out = torch.empty(shape.num_rows + 1, shape.hidden, dtype=dtype, device=self.device)
        self._row_in_block = torch.arange(shape.max_tokens_per_rank, device=self.device)

    @property
    def out(self) -> torch.Tensor:
        s = self.shape
        return self._out[:s.num_rows].view(s.slots_per_rank, s.num_ranks, s.max_tokens_per_rank, s.hidden)

    def __call__(self, x: torch.Tensor, count: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        s = self.shape
        s.check(x, count, w13, w2)
        count = count.to(self.device).clamp(0, s.max_tokens_per_rank)
        # Receive-layout row of each compact row, slot-major then source then position.
        valid = self._row_in_block < count.unsqueeze(-1)                                  # [S, R, T]
        if self.exact_rows:  # one host sync; no filler rows
            rows = valid.flatten().nonzero().squeeze(1)[:s.capacity_rows]
        else:
            rows = torch.nonzero_static(valid.flatten(), size=s.capacity_rows, fill_value=s.num_rows).squeeze(1)
        offs = count.sum(dim=1).cumsum(0).clamp(max=s.capacity_rows).to(torch.int32)      # [S]
        xs = x.reshape(s.num_rows, s.hidden)[rows.clamp(max=s.num_rows - 1)]              # [capacity_rows, H]
        h13 = grouped_mm(xs, w13.transpose(1, 2), offs, use_torch=self.use_torch_grouped_mm)  # [rows, 2I]
        h = F.silu(h13[:, :s.inter]) * h13[:, s.inter:]                                  # [rows, I]
        y = grouped_mm(h, w2.transpose(1, 2), offs, use_torch=self.use_torch_grouped_mm)  # [rows, H]
        self._out.index_copy_(0, rows, y)
        return self.out


class TorchFp8ExpertStage:
    """The FP8 expert stage in plain torch ops, one slot at a time (any device; the fallback where the
    CUTLASS FP8 stage does not run, and what the CPU tests run ``MoELayer``'s FP8 path with). It reads
    the counts on the host, so unlike the CUTLASS stage it cannot be captured in a CUDA graph.

    Same call as ``CutlassFp8ExpertStage``: ``stage(x, x_scale, count, w13, w2)`` with x float8_e4m3fn in
    the receive layout, x_scale per 128 channels or per row, w13/w2 ``Fp8Weight``; returns bf16 in the
    receive layout (zero past each block's count). Rounds where the fused stage does: GEMM outputs to
    bf16, the SwiGLU output requantised per token and 128 channels (``eep.fp8.quantize_rows``).
    """

    is_graph_safe = False  # counts are read on the host

    def __init__(self, shape: ExpertStageShape, *, device: torch.device | str):
        self.shape = shape
        self.device = torch.device(device)

    def __call__(self, x: torch.Tensor, x_scale: torch.Tensor, count: torch.Tensor, w13, w2) -> torch.Tensor:
        from eep.fp8 import dequantize_rows, quantize_rows

        s = self.shape
        out = torch.zeros(x.shape, dtype=torch.bfloat16, device=x.device)
        count = count.clamp(0, s.max_tokens_per_rank).tolist()
        for slot in range(s.slots_per_rank):
            sizes = count[slot]
            if not sum(sizes):
                continue
            rows = torch.cat([x[slot, src, :n] for src, n in enumerate(sizes)])
            scales = torch.cat([x_scale[slot, src, :n] for src, n in enumerate(sizes)])
            h13 = (dequantize_rows(rows, scales) @ w13[slot].dequantize().T).to(torch.bfloat16)  # [rows, 2I]
            h = F.silu(h13[:, :s.inter].float()) * h13[:, s.inter:].float()
            y = (dequantize_rows(*quantize_rows(h)) @ w2[slot].dequantize().T).to(torch.bfloat16)
            for src, part in enumerate(y.split(sizes)):
                out[slot, src, :sizes[src]] = part
        return out
