"""The failure benchmark's oracle: the bench model's next tokens in readable PyTorch, no EP.

The GPU engine (``eep.runtime.engines.gpu``) serves ``eep.runtime.model``'s bench model; this module
computes what it must answer, rounding where the engine rounds (docstring below). With block-scaled
FP8 experts each expert is ``eep.reference.fp8.expert_mlp_fp8`` (the oracle of the FP8 expert stage)
on the tokens quantised as the engine's dispatch quantises them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from eep.fp8 import Fp8Weight, quantize_rows
from eep.mlp import swiglu_rounded
from eep.reference import RankReceive
from eep.reference.fp8 import expert_mlp_fp8
from eep.routing import select_experts
from eep.runtime.model import BenchWeights, TinyConfig, rms_norm


def reference_next_tokens(config: TinyConfig, weights: BenchWeights, load_expert: Callable, tokens: list[int], *,
                          combine_dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                          split_k: int = 1, fp8_scale_block: int | None = None
                          ) -> tuple[list[int], list[float], list[float]]:
    """The oracle: next token of each given token, in readable PyTorch (a per-expert loop, no EP).

    It rounds where the engine rounds, so that a correct engine agrees with it token for token on
    all but numerically undecidable tokens: expert GEMM outputs and SwiGLU in bf16 (as
    ``TorchExpertStage``), top-k contributions summed in float32 in k order (mul then add, as the
    combine kernel and ``gather_combine``) and rounded to ``combine_dtype`` (bf16 for the fused
    combine, float32 for ``gather_combine``). Only the order inside each GEMM's float32
    accumulation differs. In a 32-layer random model an unrounded float32 oracle disagreed with
    the engine on 1 of 6 sampled tokens (a router top-k near-tie flipped one layer, perf/RESULTS.md).

    Returns ``(next_tokens, margins, router_gaps)``: margin is the top-1 minus top-2 logit, router
    gap the smallest k-th minus (k+1)-th router logit over all layers; a token with a tiny gap or
    margin is one where float32 accumulation order alone can change the answer.
    ``load_expert(layer, expert) -> (w_gate, w_up, w_down)`` (any dtype, any device). ``split_k``:
    another float32 accumulation order for the expert GEMMs (``eep.reference.swiglu_rounded``).

    ``fp8_scale_block``: the experts are block-scaled FP8 (``load_expert`` returns ``eep.fp8.Fp8Weight``
    units) and each layer's bf16 activations are quantised per token in blocks of that many channels
    (``eep.runtime.engines.gpu.fp8_scale_block``: the engine's dispatch format); every expert is the FP8
    reference ``expert_mlp_fp8`` (GEMM outputs rounded to bf16, the SwiGLU output requantised 1x128),
    whose answers the engine's FP8 stage must reproduce (``split_k`` does not apply).
    """
    dev = torch.device(device)
    h = weights.embed[torch.tensor(tokens)].to(dev)
    k = config.top_k
    gaps = torch.full((len(tokens),), float("inf"), device=dev)
    for layer in range(config.num_layers):
        x = rms_norm(h).to(torch.bfloat16)  # the engine dispatches bf16 activations
        logits = x.float() @ weights.router[layer].to(dev).T
        if k < config.num_experts:
            top = logits.topk(k + 1, -1).values
            gaps = torch.minimum(gaps, top[:, k - 1] - top[:, k])
        topk_weights, topk_ids = select_experts(logits, k)
        ys = torch.zeros(len(tokens), k, config.hidden, dtype=torch.bfloat16, device=dev)
        if fp8_scale_block is not None:
            values, scales = quantize_rows(x, block=fp8_scale_block)
            scales = scales.squeeze(-1) if fp8_scale_block >= config.hidden else scales  # one per row
        for expert in sorted(set(topk_ids.flatten().tolist())):
            rows, slots = (topk_ids == expert).nonzero(as_tuple=True)
            if fp8_scale_block is not None:
                ys[rows, slots] = fp8_expert(values[rows], scales[rows], *(w.to(dev) for w in load_expert(layer, expert)))
                continue
            w_gate, w_up, w_down = (t.to(dev, torch.bfloat16) for t in load_expert(layer, expert))
            ys[rows, slots] = swiglu_rounded(x[rows], w_gate, w_up, w_down, split_k=split_k)
        acc = torch.zeros(len(tokens), config.hidden, dtype=torch.float32, device=dev)
        for j in range(k):
            acc = acc + topk_weights[:, j:j + 1] * ys[:, j].float()
        h = h + acc.to(combine_dtype).float()
    logits = rms_norm(h) @ weights.lm_head.to(dev).T
    top2 = logits.topk(2, -1).values
    return logits.argmax(-1).tolist(), (top2[:, 0] - top2[:, 1]).tolist(), gaps.tolist()


def fp8_expert(values: torch.Tensor, scales: torch.Tensor, w_gate: Fp8Weight, w_up: Fp8Weight,
               w_down: Fp8Weight) -> torch.Tensor:
    """One FP8 expert on ``n`` quantised rows (``[n, hidden]`` e4m3, scales ``[n, blocks]`` or ``[n]``)
    -> ``[n, hidden]`` bf16: the FP8 reference over a receive layout of one slot and one source."""
    n = values.shape[0]
    recv = RankReceive(x=values[None, None], count=torch.tensor([[n]], dtype=torch.int32),
                       src_token=torch.arange(n, dtype=torch.int32)[None, None])
    stacked = [Fp8Weight(w.weight[None], w.scale[None]) for w in (w_gate, w_up, w_down)]
    return expert_mlp_fp8(recv, scales[None, None], *stacked)[0, 0]
