"""The router convention shared by Mixtral and Qwen2/3-MoE: softmax -> top-k -> optional renormalisation."""

from __future__ import annotations

import torch

from eep.errors import RoutingError
from eep.routing.finite import check_finite_rows
from eep.routing.route import check_topk


def select_experts(router_logits: torch.Tensor, top_k: int, *, renormalize: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick each token's experts from its router logits.

    Parameters:
        router_logits: ``[num_tokens, num_experts]`` float.
    Returns:
        ``(topk_weights [num_tokens, top_k] float32, topk_ids [num_tokens, top_k] int64)``.
        The softmax runs in float32 whatever the logits' dtype, as the HF models do.
    Raises ``RoutingError`` naming the token rows whose logits hold NaN or inf (host tensors; device
    tensors as ``eep.routing.finite`` says, without waiting for the device by default).
    """
    if router_logits.dim() != 2:
        raise RoutingError(f"router_logits has shape {tuple(router_logits.shape)}, expected [num_tokens, num_experts]")
    if not router_logits.is_floating_point():
        raise RoutingError(f"router_logits has dtype {router_logits.dtype}, expected a floating type")
    if not 1 <= top_k <= router_logits.shape[1]:
        raise RoutingError(f"top_k={top_k} must be in [1, num_experts={router_logits.shape[1]}]")
    check_finite_rows(router_logits, "router_logits")
    probs = torch.softmax(router_logits.float(), dim=-1)
    topk_weights, topk_ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights, topk_ids


def resolve_routing(hidden: torch.Tensor, num_experts: int, router_logits: torch.Tensor | None, top_k: int | None,
                     renormalize: bool, topk_ids: torch.Tensor | None, topk_weights: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(topk_weights, topk_ids)`` from router logits (``select_experts``) or from a precomputed,
    validated top-k: the two ways a MoE layer is told where tokens go (exactly one must be given)."""
    if router_logits is not None:
        if topk_ids is not None or topk_weights is not None:
            raise RoutingError("pass either router_logits or topk_ids/topk_weights, not both")
        if tuple(router_logits.shape) != (hidden.shape[0], num_experts):
            raise RoutingError(f"router_logits has shape {tuple(router_logits.shape)}, "
                               f"expected [{hidden.shape[0]}, {num_experts}]")
        if top_k is None:
            raise RoutingError("router_logits needs top_k")
        return select_experts(router_logits, top_k, renormalize=renormalize)
    if topk_ids is None or topk_weights is None:
        raise RoutingError("pass router_logits, or both topk_ids and topk_weights")
    check_topk(topk_ids, num_experts, hidden.shape[0], topk_weights=topk_weights)
    check_finite_rows(topk_weights, "topk_weights")
    return topk_weights, topk_ids.long()
