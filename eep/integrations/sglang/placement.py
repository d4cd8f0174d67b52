"""SGLang's expert-location maps <-> eep's ``ExpertPlacement``, and writing them in place.

SGLang (``sglang.srt.eplb.expert_location.ExpertLocationMetadata``) and eep use the same index
spaces under different names:

| SGLang field | shape | eep |
| --- | --- | --- |
| ``physical_to_logical_map`` | ``[num_layers, num_physical_experts]`` | ``phys_to_logical`` |
| ``logical_to_all_physical_map`` | ``[num_layers, num_logical_experts, width]``, -1 padded | ``logical_to_phys`` (``width = num_ranks``) |
| ``logical_to_all_physical_map_num_valid`` | ``[num_layers, num_logical_experts]`` | ``replica_count`` |
| ``ep_size`` | | ``num_ranks`` |
| ``num_physical_experts // ep_size`` | | ``slots_per_rank`` |

``physical_to_logical_map`` is the source of truth on both sides. SGLang pads
``logical_to_all_physical_map`` to ``width = num_physical_experts`` and, when an all-to-all backend
is on and the rank is known, collapses each row to the replica on the calling rank (its "nearest
expert"): such a row is a subset of the expert's replicas, which the check here accepts.

Differences that raise ``PlacementError`` instead of converting silently: eep holds an expert at
most once per rank (SGLang allows two copies on one rank when a rank has more slots than there are
experts); SGLang has no "empty slot" value in ``physical_to_logical_map`` (eep's ``NO_EXPERT``).

``write_placement_`` and ``adopt_metadata_`` write into an existing metadata object's tensors, so a
CUDA graph captured before a placement change keeps reading the right storage (docs/integrations.md
explains why SGLang's own recovery broadcast does not).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from eep.errors import PlacementError
from eep.state.placement import NO_EXPERT, ExpertPlacement

# The tensor fields of SGLang's ExpertLocationMetadata, in the order SGLang's own ``update`` walks them.
METADATA_TENSOR_FIELDS = ("physical_to_logical_map", "physical_to_logical_map_cpu", "logical_to_all_physical_map",
                          "logical_to_all_physical_map_cpu", "logical_to_all_physical_map_num_valid",
                          "logical_to_rank_dispatch_physical_map")


@dataclass
class SGLangExpertMaps:
    """The three maps SGLang keeps per MoE model (field names as in SGLang).

    physical_to_logical_map: ``[num_layers, num_physical_experts]`` int64.
    logical_to_all_physical_map: ``[num_layers, num_logical_experts, width]`` int64, ascending
        physical ids, -1 padded.
    logical_to_all_physical_map_num_valid: ``[num_layers, num_logical_experts]`` int64.
    """

    physical_to_logical_map: torch.Tensor
    logical_to_all_physical_map: torch.Tensor
    logical_to_all_physical_map_num_valid: torch.Tensor


def placement_from_sglang(metadata: Any, *, active: Sequence[bool] | None = None,
                          layers: Sequence[int] | None = None) -> ExpertPlacement:
    """eep's placement from SGLang's ``ExpertLocationMetadata`` (or anything with its fields).

    Checks that ``logical_to_all_physical_map`` / ``..._num_valid`` agree with
    ``physical_to_logical_map`` (each valid entry is a replica of its row's expert, padding is -1),
    naming the first layer and expert that disagree.

    Parameters:
        active: one flag per rank; the slots of an inactive rank become ``NO_EXPERT`` (SGLang keeps
            a value in ``physical_to_logical_map`` for a slot nobody routes to; eep has an empty slot).
        layers: the rows of the maps to take, in order (the MoE layers); default every row.
    """
    rows = slice(None) if layers is None else list(layers)
    p2l = metadata.physical_to_logical_map.detach().to("cpu", torch.int64)[rows]
    l2p = metadata.logical_to_all_physical_map.detach().to("cpu", torch.int64)[rows]
    num_valid = metadata.logical_to_all_physical_map_num_valid.detach().to("cpu", torch.int64)[rows]
    num_ranks = int(metadata.ep_size)
    num_layers, num_phys = p2l.shape
    if num_phys % num_ranks:
        raise PlacementError(f"physical_to_logical_map has {num_phys} physical experts, not a multiple of "
                             f"ep_size={num_ranks}")
    num_experts = l2p.shape[1]
    if bool((p2l == NO_EXPERT).any()):
        layer, slot = (int(i) for i in (p2l == NO_EXPERT).nonzero()[0])
        raise PlacementError(f"physical_to_logical_map[{layer}, {slot}] = -1: SGLang maps have no empty slot")
    placement = ExpertPlacement.from_phys_to_logical(p2l, num_ranks=num_ranks, slots_per_rank=num_phys // num_ranks,
                                                     num_experts=num_experts)
    _check_all_physical(p2l, l2p, num_valid)
    if active is None:
        return placement
    if len(active) != num_ranks:
        raise PlacementError(f"active has {len(active)} flags for ep_size={num_ranks}")
    dead = ~torch.tensor([bool(a) for a in active]).repeat_interleave(num_phys // num_ranks)
    return ExpertPlacement.from_phys_to_logical(p2l.masked_fill(dead, NO_EXPERT), num_ranks=num_ranks,
                                                slots_per_rank=num_phys // num_ranks, num_experts=num_experts)


def sglang_maps_from_placement(placement: ExpertPlacement, *, width: int | None = None,
                               moe_ep_rank: int | None = None) -> SGLangExpertMaps:
    """SGLang's maps for ``placement`` (CPU int64 tensors).

    Parameters:
        width: last dim of ``logical_to_all_physical_map``; default ``num_phys_slots``, as SGLang pads.
        moe_ep_rank: when given, each row keeps only the replica on that rank if there is one
            (SGLang's same-GPU "nearest expert" collapse; its same-node preference is not applied).
    """
    if bool((placement.phys_to_logical == NO_EXPERT).any()):
        layer, slot = (int(i) for i in (placement.phys_to_logical == NO_EXPERT).nonzero()[0])
        raise PlacementError(f"placement has an empty slot (layer {layer}, physical slot {slot}); SGLang's "
                             f"physical_to_logical_map cannot express one: fill it with a replica first")
    return _maps(placement, width, moe_ep_rank)


def _maps(placement: ExpertPlacement, width: int | None, moe_ep_rank: int | None) -> SGLangExpertMaps:
    """SGLang's maps; an empty slot stays -1 in ``physical_to_logical_map`` (the caller fills it)."""
    width = placement.num_phys_slots if width is None else int(width)
    counts = placement.replica_count.clone()
    l2p = placement.logical_to_phys.clone()
    if moe_ep_rank is not None:
        on_rank = (l2p // placement.slots_per_rank == moe_ep_rank) & (l2p != NO_EXPERT)
        has_local = on_rank.any(-1)
        local = torch.where(on_rank, l2p, torch.full_like(l2p, NO_EXPERT)).amax(-1)  # at most one per rank
        collapsed = torch.full_like(l2p, NO_EXPERT)
        collapsed[..., 0] = local
        l2p = torch.where(has_local.unsqueeze(-1), collapsed, l2p)
        counts = torch.where(has_local, torch.ones_like(counts), counts)
    if int(counts.max()) > width:
        raise PlacementError(f"an expert has {int(counts.max())} replicas, more than the map width {width}")
    padded = torch.full((*l2p.shape[:2], width), NO_EXPERT, dtype=torch.int64)
    keep = min(width, l2p.shape[-1])
    padded[..., :keep] = l2p[..., :keep]
    return SGLangExpertMaps(placement.phys_to_logical.clone(), padded, counts)


def write_placement_(metadata: Any, placement: ExpertPlacement, *, moe_ep_rank: int | None = None,
                     active: Sequence[bool] | None = None, layers: Sequence[int] | None = None) -> None:
    """Write ``placement`` into ``metadata``'s existing tensors (data pointers unchanged).

    ``logical_to_rank_dispatch_physical_map`` (SGLang's static dispatch table), when present, gets
    the replica on ``moe_ep_rank`` if there is one, else replica ``moe_ep_rank % replica_count``: a
    deterministic spread where SGLang draws a seeded random one. Every check runs before the first write.

    Parameters:
        active: one flag per rank. An empty slot (``NO_EXPERT``) is allowed only on an inactive rank:
            no map lists it, and ``physical_to_logical_map`` keeps the value it had (SGLang has no
            empty value; its own elastic rebalance writes 0 there).
        layers: the rows of the maps ``placement``'s layers are (the MoE layers); the other rows
            are left as they are. Default: every row.
    """
    if int(metadata.ep_size) != placement.num_ranks:
        raise PlacementError(f"metadata.ep_size={metadata.ep_size} but the placement has {placement.num_ranks} ranks")
    empty = placement.phys_to_logical == NO_EXPERT
    if active is not None:
        if len(active) != placement.num_ranks:
            raise PlacementError(f"active has {len(active)} flags for {placement.num_ranks} ranks")
        live = torch.tensor([bool(a) for a in active]).repeat_interleave(placement.slots_per_rank)
        if bool((empty & live).any()):
            layer, slot = (int(i) for i in (empty & live).nonzero()[0])
            raise PlacementError(f"placement has an empty slot on active rank {slot // placement.slots_per_rank} "
                                 f"(layer {layer}, physical slot {slot}); SGLang's maps cannot express one")
        maps = _maps(placement, metadata.logical_to_all_physical_map.shape[-1], moe_ep_rank)
    else:
        maps = sglang_maps_from_placement(placement, width=metadata.logical_to_all_physical_map.shape[-1],
                                          moe_ep_rank=moe_ep_rank)
    rows = list(range(placement.num_layers)) if layers is None else [int(r) for r in layers]
    total = metadata.physical_to_logical_map.shape[0]
    if len(rows) != placement.num_layers or not all(0 <= r < total for r in rows):
        raise PlacementError(f"layers {rows} do not name {placement.num_layers} rows of maps with {total} layers")
    p2l_now = metadata.physical_to_logical_map_cpu.detach().to("cpu", torch.int64)
    p2l = p2l_now.clone()
    p2l[rows] = torch.where(empty, p2l_now[rows], maps.physical_to_logical_map)
    l2p = metadata.logical_to_all_physical_map_cpu.detach().to("cpu", torch.int64).clone()
    l2p[rows] = maps.logical_to_all_physical_map
    num_valid = metadata.logical_to_all_physical_map_num_valid.detach().to("cpu", torch.int64).clone()
    num_valid[rows] = maps.logical_to_all_physical_map_num_valid
    new = {"physical_to_logical_map": p2l, "physical_to_logical_map_cpu": p2l,
           "logical_to_all_physical_map": l2p, "logical_to_all_physical_map_cpu": l2p,
           "logical_to_all_physical_map_num_valid": num_valid}
    if getattr(metadata, "logical_to_rank_dispatch_physical_map", None) is not None:
        if moe_ep_rank is None:
            raise PlacementError("metadata has a logical_to_rank_dispatch_physical_map (static dispatch): "
                                 "pass moe_ep_rank to rebuild it")
        dispatch = metadata.logical_to_rank_dispatch_physical_map.detach().to("cpu", torch.int64).clone()
        dispatch[rows] = _rank_dispatch_map(placement, moe_ep_rank)
        new["logical_to_rank_dispatch_physical_map"] = dispatch
    _copy_fields_(metadata, new)


def adopt_metadata_(target: Any, source: Any) -> None:
    """Make ``target`` (an ``ExpertLocationMetadata``) hold ``source``'s maps by writing in place.

    Raises ``PlacementError`` naming the field when a shape differs or only one side has a field
    (then the storage cannot be kept: e.g. an EP scale-up changes ``num_physical_experts``).
    """
    if int(target.ep_size) != int(source.ep_size):
        raise PlacementError(f"cannot adopt metadata of ep_size={source.ep_size} into ep_size={target.ep_size} in place")
    new = {}
    for name in METADATA_TENSOR_FIELDS:
        src, dst = getattr(source, name, None), getattr(target, name, None)
        if (src is None) != (dst is None):
            raise PlacementError(f"metadata field {name} is {'absent' if src is None else 'present'} in the new "
                                 f"metadata but not in the old one")
        if src is not None:
            new[name] = src
    _copy_fields_(target, new)


# ---- internals ----

def _copy_fields_(metadata: Any, new: dict[str, torch.Tensor]) -> None:
    for name, value in new.items():
        dst = getattr(metadata, name)
        if tuple(dst.shape) != tuple(value.shape):
            raise PlacementError(f"metadata.{name} has shape {tuple(dst.shape)}, the new map {tuple(value.shape)}: "
                                 f"cannot write it in place")
    for name, value in new.items():
        getattr(metadata, name).copy_(value)  # copy_ converts dtype and device; the storage stays


def _rank_dispatch_map(placement: ExpertPlacement, moe_ep_rank: int) -> torch.Tensor:
    """``[num_layers, num_experts]``: the physical slot rank ``moe_ep_rank`` sends each expert to."""
    l2p, counts = placement.logical_to_phys, placement.replica_count
    on_rank = (l2p // placement.slots_per_rank == moe_ep_rank) & (l2p != NO_EXPERT)
    local = torch.where(on_rank, l2p, torch.full_like(l2p, NO_EXPERT)).amax(-1)
    spread = l2p.gather(-1, (moe_ep_rank % counts.clamp(min=1)).unsqueeze(-1)).squeeze(-1)
    return torch.where(on_rank.any(-1), local, spread)


def _check_all_physical(p2l: torch.Tensor, l2p: torch.Tensor, num_valid: torch.Tensor) -> None:
    num_layers, num_experts, width = l2p.shape
    if tuple(num_valid.shape) != (num_layers, num_experts) or p2l.shape[0] != num_layers:
        raise PlacementError(f"logical_to_all_physical_map {tuple(l2p.shape)}, ..._num_valid {tuple(num_valid.shape)} "
                             f"and physical_to_logical_map {tuple(p2l.shape)} disagree on layers or experts")
    position = torch.arange(width)
    valid = position < num_valid.unsqueeze(-1)
    bad_pad = ~valid & (l2p != NO_EXPERT)
    if bool(bad_pad.any()):
        layer, expert, _ = (int(i) for i in bad_pad.nonzero()[0])
        raise PlacementError(f"logical_to_all_physical_map[{layer}, {expert}] has entries past num_valid="
                             f"{int(num_valid[layer, expert])} that are not -1")
    in_range = (l2p >= 0) & (l2p < p2l.shape[1])
    holder = p2l.gather(1, torch.where(in_range, l2p, 0).view(num_layers, -1)).view_as(l2p)
    wrong = valid & (~in_range | (holder != torch.arange(num_experts).view(1, -1, 1)))
    if bool(wrong.any()):
        layer, expert, k = (int(i) for i in wrong.nonzero()[0])
        raise PlacementError(f"logical_to_all_physical_map[{layer}, {expert}, {k}] = {int(l2p[layer, expert, k])} "
                             f"is not a physical expert holding logical expert {expert}")
    if bool((num_valid < 1).any()):
        layer, expert = (int(i) for i in (num_valid < 1).nonzero()[0])
        raise PlacementError(f"logical expert {expert} of layer {layer} has no physical replica")
