"""FP8 experts over the receive layout, written plainly: the oracle of the FP8 expert stage (``eep.fused.gemm``).

One expert is ``eep.mlp.swiglu_fp8``; this module runs it over every received row.

Weights are block-scaled FP8 (``eep.fp8.Fp8Weight``: e4m3 weights, one float32 scale per 128x128
block, as DeepSeek-V3 and the Qwen3 "-FP8" checkpoints ship them). Activations travel as the FP8
dispatch sends them: e4m3 values with one scale per token and 128 channels (``eep.fp8.quantize_rows``;
a per-row scale, one per token, is accepted too). One expert then computes, rounding exactly where
the fused stage rounds:

    x     = values * scale of its block                        float32
    gate  = x @ dequant(w_gate)^T,  up = x @ dequant(w_up)^T    float32 result, rounded to bf16
    h     = silu(gate) * up                                      float32
    h_q   = quantize_rows(h)                                     requantised per token, 1x128
    y     = dequant(h_q) @ dequant(w_down)^T                     float32 result, rounded to bf16

Mathematically ``dequant(a) @ dequant(b)^T`` is the sum over 128-wide K blocks of
``(a_q @ b_q^T) * scale_a * scale_b``, which is what a blockwise-scaled FP8 GEMM accumulates; the two
differ only in summation order. The oracle sums in float64 and rounds to float32 (``eep.mlp``:
a row's value must not depend on which rows share its matmul, as a float32 BLAS sum's would).
``gate``/``up`` are rounded to bf16 because the stage stores
them so between its GEMM and its SwiGLU kernel, and that rounding moves the requantisation's
decisions (3.3% of the e4m3 values of ``h`` at the deepseek-v3 shape): skipping it here would put
the oracle 1.4% away from any bf16-storing stage, beyond the 1e-2 the stage is held to.
"""

from __future__ import annotations

import torch

from eep.exchange.layout import RankReceive
from eep.fp8 import Fp8Weight
from eep.mlp import swiglu_fp8


def expert_mlp_fp8(recv: RankReceive, recv_scale: torch.Tensor, w_gate: Fp8Weight, w_up: Fp8Weight,
                   w_down: Fp8Weight) -> torch.Tensor:
    """``swiglu_fp8`` for every received row of every local slot.

    Parameters:
        recv: the receive layout with ``x`` e4m3 ``[slots_per_rank, num_ranks, max_tokens_per_rank, hidden]``.
        recv_scale: ``[slots_per_rank, num_ranks, max_tokens_per_rank, hidden/128]`` float32 (or one
            scale per row, without the last dimension), laid out like ``recv.x``.
        w_gate, w_up: ``[slots_per_rank, inter, hidden]``; w_down: ``[slots_per_rank, hidden, inter]``.
    Returns:
        ``[slots_per_rank, num_ranks, max_tokens_per_rank, hidden]`` bf16, zero past each block's count.
    """
    out = torch.zeros(recv.x.shape, dtype=torch.bfloat16, device=recv.x.device)
    for local in range(recv.x.shape[0]):
        for src in range(recv.x.shape[1]):
            n = int(recv.count[local, src])
            if n:
                out[local, src, :n] = swiglu_fp8(recv.x[local, src, :n], recv_scale[local, src, :n],
                                                 w_gate[local], w_up[local], w_down[local])
    return out
