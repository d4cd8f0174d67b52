"""The expert MLP and the dense MoE: the arithmetic every path computes (DESIGN.md "Contracts").

``swiglu`` is one expert, ``down(silu(gate(x)) * up(x))``; ``swiglu_rounded`` the same, rounded where
a bf16 expert stage rounds; ``swiglu_fp8`` one block-scaled FP8 expert on FP8 tokens, rounded where
the FP8 stage rounds (``eep/reference/fp8.py`` says where and why); ``dense_moe`` the whole MoE on one device over all experts (softmax ->
top-k -> optional renormalisation -> weighted sum of SwiGLU experts), what Mixtral / Qwen3-MoE
compute. They are definitions, not an EP path: the reference (``eep.reference``) builds its oracle on
them, and the runtime's served model uses them to define what its engines must answer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from eep.fp8 import ExpertWeight, Fp8Weight, dequantize_rows, quantize_rows
from eep.routing import resolve_routing


def dense_moe(hidden: torch.Tensor, w_gate: ExpertWeight, w_up: ExpertWeight, w_down: ExpertWeight, *,
              router_logits: torch.Tensor | None = None, top_k: int | None = None, renormalize: bool = True,
              topk_ids: torch.Tensor | None = None, topk_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Single-device MoE over all experts: the oracle every EP path must match.

    Parameters:
        hidden: ``[num_tokens, hidden]``; w_gate, w_up: ``[num_experts, intermediate, hidden]``;
        w_down: ``[num_experts, hidden, intermediate]`` (tensors, or ``Fp8Weight`` stacks: FP8 experts,
        tokens quantised per 1x128 block first, as the FP8 dispatch sends them). Either ``router_logits`` ``[num_tokens,
        num_experts]`` with ``top_k``, or precomputed ``topk_ids``/``topk_weights`` ``[num_tokens, top_k]``.
    """
    topk_weights, topk_ids = resolve_routing(hidden, w_gate.shape[0], router_logits, top_k, renormalize,
                                              topk_ids, topk_weights)
    is_fp8 = isinstance(w_gate, Fp8Weight)
    if is_fp8:
        values, scales = quantize_rows(hidden)
    acc = torch.zeros(hidden.shape[0], hidden.shape[1], dtype=torch.float32, device=hidden.device)
    for expert in topk_ids.unique().tolist():
        token, k = (topk_ids == expert).nonzero(as_tuple=True)
        if is_fp8:
            y = swiglu_fp8(values[token], scales[token], w_gate[expert], w_up[expert], w_down[expert])
        else:
            y = swiglu(hidden[token], w_gate[expert], w_up[expert], w_down[expert])
        acc.index_add_(0, token, topk_weights[token, k].float().unsqueeze(1) * y.float())
    if is_fp8:  # FP8 experts answer in bf16, and their sum crosses the wire back in bf16
        acc = acc.to(torch.bfloat16)
    return acc.to(hidden.dtype)


def swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """One expert: ``[n, hidden] -> [n, hidden]``, float32 inside, activation dtype out."""
    xf = x.float()
    h = F.silu(xf @ w_gate.float().T) * (xf @ w_up.float().T)
    return (h @ w_down.float().T).to(x.dtype)


def swiglu_rounded(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, *,
                   split_k: int = 1) -> torch.Tensor:
    """One expert rounded where a bf16 expert stage rounds (``eep.fused.gemm``): each GEMM
    accumulates in float32 and writes bf16, silu and the product run on bf16 tensors. Oracles of
    deep models use it: float32 inside (``swiglu``) drifts from any bf16 engine by enough, over
    tens of layers, to flip router near-ties.

    ``split_k > 1`` sums each GEMM as that many float32 partial products over slices of the
    reduction dimension: another accumulation order, as valid as any engine's. Answers that change
    with it are decided by rounding alone (how the failure benchmark finds undecidable tokens)."""
    xf = x.float()
    gate = _matmul_f32(xf, w_gate.float().T, split_k).to(torch.bfloat16)
    up = _matmul_f32(xf, w_up.float().T, split_k).to(torch.bfloat16)
    return _matmul_f32((F.silu(gate) * up).float(), w_down.float().T, split_k).to(torch.bfloat16)


def _matmul_f32(a: torch.Tensor, b: torch.Tensor, split_k: int) -> torch.Tensor:
    if split_k <= 1:
        return a @ b
    out = None
    for a_part, b_part in zip(a.tensor_split(split_k, dim=1), b.tensor_split(split_k, dim=0)):
        out = a_part @ b_part if out is None else out + a_part @ b_part
    return out


def swiglu_fp8(x_values: torch.Tensor, x_scales: torch.Tensor, w_gate: Fp8Weight, w_up: Fp8Weight,
               w_down: Fp8Weight) -> torch.Tensor:
    """One expert on FP8 tokens: ``x_values [n, hidden]`` e4m3 with ``x_scales [n, hidden/128]`` (or
    ``[n]``) -> ``[n, hidden]`` bf16. Weights: ``w_gate``, ``w_up`` ``[inter, hidden]``, ``w_down
    [hidden, inter]``, each with its block scales."""
    x = dequantize_rows(x_values, x_scales)
    gate = _rowwise_f32(x, w_gate.dequantize()).to(torch.bfloat16)
    up = _rowwise_f32(x, w_up.dequantize()).to(torch.bfloat16)
    h = F.silu(gate.float()) * up.float()
    h_values, h_scales = quantize_rows(h)
    return _rowwise_f32(dequantize_rows(h_values, h_scales), w_down.dequantize()).to(torch.bfloat16)


def _rowwise_f32(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``a @ w.T`` rounded to float32 from a float64 sum, so that a row's value does not depend on the
    other rows of the matmul. A float32 BLAS kernel sums in an order set by the matrix's row count and
    a row's place in it, and the FP8 oracle rounds the result to bf16 right after: the same token then
    came out one bf16 step apart inside a dense expert's batch and inside one source's block (seen with
    4 of 13 rows on the CPU), where the EP reference must equal ``dense_moe`` bit for bit. float32
    products are exact in float64 and the sum's error is ~2^-53 relative, so the float32 result is
    the correctly rounded one except within that distance of a rounding boundary."""
    return (a.double() @ w.double().T).float()
