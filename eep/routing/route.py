"""Logical top-k expert ids -> physical slots, choosing among replicas on active ranks.

Pure tensor ops on device tables, with static shapes and no host synchronisation, so a CUDA
graph can capture them; a membership change is an in-place write of ``active_mask`` and a
placement change an in-place write of ``logical_to_phys``, both seen by the next replay.

Replica choice is deterministic for a given token index: token ``t``'s ``k``-th choice takes the
``(t * top_k + k) mod num_live``-th live replica, which spreads a hot expert's tokens evenly over
its replicas without any random state.
"""

from __future__ import annotations

import torch

from eep.errors import RoutingError
from eep.state.placement import NO_EXPERT


def route_to_phys(topk_ids: torch.Tensor, logical_to_phys: torch.Tensor, active_mask: torch.Tensor,
                  slots_per_rank: int, *, token_offset: int | torch.Tensor = 0) -> torch.Tensor:
    """Map logical expert ids to physical slots on active ranks.

    Parameters:
        topk_ids: ``[num_tokens, top_k]`` int, logical expert ids of one layer.
        logical_to_phys: ``[num_experts, max_replicas]`` int64 of that layer, ``NO_EXPERT`` padded.
        active_mask: ``[num_ranks]`` bool or int, non-zero for active ranks.
        slots_per_rank: physical slots per rank.
        token_offset: global index of the first token (so a rank's tokens pick replicas as the
            same tokens would in one big batch).
    Returns:
        ``[num_tokens, top_k]`` int64 physical slots; ``NO_EXPERT`` where the expert has no
        replica on an active rank (an invalid instance: ``check_validity`` reports it).
    """
    num_tokens, top_k = topk_ids.shape
    ids = topk_ids.long()
    candidates = logical_to_phys[ids]  # [T, K, R]
    cand_rank = torch.where(candidates >= 0, candidates // slots_per_rank, 0)
    live = (candidates >= 0) & active_mask.bool()[cand_rank]  # [T, K, R]
    num_live = live.sum(-1)  # [T, K]
    token_idx = torch.arange(num_tokens, device=ids.device).unsqueeze(1) + token_offset
    pick = (token_idx * top_k + torch.arange(top_k, device=ids.device)) % num_live.clamp(min=1)  # [T, K]
    chosen = live & (live.cumsum(-1) == (pick + 1).unsqueeze(-1))  # one-hot over R
    phys = (candidates * chosen).sum(-1)
    return torch.where(num_live > 0, phys, torch.full_like(phys, NO_EXPERT))


def check_topk(topk_ids: torch.Tensor, num_experts: int, num_tokens: int, *,
               topk_weights: torch.Tensor | None = None) -> None:
    """Validate routing input on the host (not for the captured fast path: it synchronises)."""
    if topk_ids.dim() != 2 or topk_ids.shape[0] != num_tokens:
        raise RoutingError(f"topk_ids has shape {tuple(topk_ids.shape)}, expected [{num_tokens}, top_k]")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise RoutingError(f"topk_ids has dtype {topk_ids.dtype}, expected int32 or int64")
    if topk_ids.numel():
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        if lo < 0 or hi >= num_experts:
            bad = lo if lo < 0 else hi
            token = int((topk_ids == bad).nonzero()[0, 0])
            raise RoutingError(f"topk_ids holds expert id {bad} (token {token}), outside [0, {num_experts})")
        srt = topk_ids.sort(-1).values
        dup = (srt[:, 1:] == srt[:, :-1]).any(-1)
        if bool(dup.any()):
            token = int(dup.nonzero()[0, 0])
            raise RoutingError(f"topk_ids row {token} names the same expert twice: {topk_ids[token].tolist()}")
    if topk_weights is not None:
        if tuple(topk_weights.shape) != tuple(topk_ids.shape):
            raise RoutingError(f"topk_weights has shape {tuple(topk_weights.shape)}, "
                               f"expected {tuple(topk_ids.shape)} like topk_ids")
        if not topk_weights.is_floating_point():
            raise RoutingError(f"topk_weights has dtype {topk_weights.dtype}, expected a floating type")
