"""The router convention shared by Mixtral and Qwen2/3-MoE: softmax -> top-k -> optional renormalisation."""

from __future__ import annotations

import torch

from eep.errors import RoutingError


def select_experts(router_logits: torch.Tensor, top_k: int, *, renormalize: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick each token's experts from its router logits.

    Parameters:
        router_logits: ``[num_tokens, num_experts]`` float.
    Returns:
        ``(topk_weights [num_tokens, top_k] float32, topk_ids [num_tokens, top_k] int64)``.
        The softmax runs in float32 whatever the logits' dtype, as the HF models do.
    """
    if router_logits.dim() != 2:
        raise RoutingError(f"router_logits has shape {tuple(router_logits.shape)}, expected [num_tokens, num_experts]")
    if not router_logits.is_floating_point():
        raise RoutingError(f"router_logits has dtype {router_logits.dtype}, expected a floating type")
    if not 1 <= top_k <= router_logits.shape[1]:
        raise RoutingError(f"top_k={top_k} must be in [1, num_experts={router_logits.shape[1]}]")
    probs = torch.softmax(router_logits.float(), dim=-1)
    topk_weights, topk_ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights, topk_ids
