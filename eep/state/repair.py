"""Deterministic coverage repair of the placement maps after ranks fail.

Every survivor runs this on the same ``(placement, membership)`` and gets the same answer, so no
exchange is needed to agree on the new maps: only the membership decision is broadcast.

Per layer:
  0. Slots on dead ranks become empty. Experts that keep a live replica are now routed to the
     survivors only: no bytes move for them ("routing-only").
  1. Orphans (experts with no live replica) are taken in ascending id order.
  2. Each orphan takes a spare (empty) slot, visiting the surviving ranks round-robin, starting
     at ``layer % num_active`` so that consecutive layers do not all land on the same rank.
  3. When no spare slot is left, it takes a donor slot: a replica of the expert that currently
     has the most replicas (ties: lowest id), on the first rank in round-robin order holding one.
  4. If neither exists the layer cannot be repaired: ``InsufficientSlotsError`` says how many
     slots are missing. Nothing is applied in that case (the function is pure). With
     ``allow_uncovered=True`` it repairs what the slots allow instead (every spare, then every
     donor slot, orphans in ascending id) and lists the rest in ``CoverageRepair.uncovered``: an
     instance in that state is not EP-valid and must not serve (the runtime holds its requests
     until a rejoin covers them, or refuses them naming the experts and the missing slots).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import torch

from eep.errors import InsufficientSlotsError, PlacementError
from eep.state.membership import Membership
from eep.state.placement import NO_EXPERT, ExpertPlacement


@dataclass(frozen=True)
class SlotAssignment:
    """One physical slot that must receive a logical expert's weights before it serves."""

    layer: int
    phys_slot: int
    rank: int
    logical_expert_id: int
    old_logical_expert_id: int  # NO_EXPERT for a spare slot, else the donor expert it replaces


@dataclass
class CoverageRepair:
    """The result of ``repair_coverage``: the new maps and what it takes to make them true."""

    old_placement: ExpertPlacement
    placement: ExpertPlacement
    epoch: int
    assignments: list[SlotAssignment] = field(default_factory=list)
    num_dropped_slots: int = 0  # replicas lost on dead ranks (routing-only, no bytes)
    # only with ``allow_uncovered``: {layer: experts with no replica left}, and the slots missing in
    # the worst layer (a slot exists in every layer, so that many more slots would cover them all)
    uncovered: dict[int, list[int]] = field(default_factory=dict)
    num_missing_slots: int = 0

    @property
    def is_routing_only(self) -> bool:
        return not self.assignments

    @property
    def is_covered(self) -> bool:
        return not self.uncovered


def repair_coverage(placement: ExpertPlacement, membership: Membership, *,
                    allow_uncovered: bool = False) -> CoverageRepair:
    """New placement in which every logical expert has a replica on an active rank.

    Parameters:
        placement: the maps before the change (not modified).
        membership: the membership after the change.
        allow_uncovered: when a layer has more orphans than slots, repair as many as fit and list
            the rest in ``uncovered`` instead of raising.
    Returns:
        ``CoverageRepair`` with the new placement and the slot assignments whose weights must be
        restored (from a peer replica, host memory or disk: the repair planner decides).
    Raises:
        InsufficientSlotsError: a layer has more orphans than spare plus donor slots (unless
            ``allow_uncovered``).
    """
    if membership.num_ranks != placement.num_ranks:
        raise PlacementError(f"membership has {membership.num_ranks} rank slots, placement {placement.num_ranks}")
    active = membership.active_cpu.tolist()
    active_ranks = [r for r, a in enumerate(active) if a]
    slots = placement.slots_per_rank
    num_experts = placement.num_experts

    # 0. Forget everything on dead ranks (all layers at once; this is the routing-only part).
    new_p2l = placement.phys_to_logical.clone()
    slot_is_dead = ~membership.active_cpu.repeat_interleave(slots)
    num_dropped = int((new_p2l[:, slot_is_dead] != NO_EXPERT).sum())
    new_p2l[:, slot_is_dead] = NO_EXPERT
    key = torch.where(new_p2l == NO_EXPERT, num_experts, new_p2l)
    counts_all = torch.zeros(placement.num_layers, num_experts + 1, dtype=torch.int64).scatter_add_(
        1, key, torch.ones_like(key))[:, :num_experts]
    layers_with_orphans = (counts_all == 0).any(1).nonzero().flatten().tolist()

    # Python lists from here on: the per-orphan loop is branchy, tensor ops per element cost more.
    spare_by_layer: dict[int, dict[int, list[int]]] = {layer: {} for layer in layers_with_orphans}
    if layers_with_orphans:
        spare_all = (new_p2l == NO_EXPERT) & ~slot_is_dead
        spare_all[[l for l in range(placement.num_layers) if l not in spare_by_layer]] = False
        for layer, phys in spare_all.nonzero().tolist():
            spare_by_layer[layer].setdefault(phys // slots, []).append(phys)
    position = {rank: i for i, rank in enumerate(active_ranks)}  # round-robin order of the survivors

    assignments: list[SlotAssignment] = []
    uncovered: dict[int, list[int]] = {}
    num_missing_slots = 0
    orphans_of: dict[int, list[int]] = {layer: [] for layer in layers_with_orphans}
    for layer, expert in (counts_all == 0).nonzero().tolist():  # ascending (layer, expert)
        orphans_of[layer].append(expert)
    donors_of = (counts_all - 1).clamp(min=0).sum(1).tolist()  # replicas beyond the first, per layer
    for layer, counts in zip(layers_with_orphans, counts_all[layers_with_orphans].tolist()):
        orphans = orphans_of[layer]
        spare_by_rank = spare_by_layer[layer]
        num_spare = sum(len(v) for v in spare_by_rank.values())
        num_donor = donors_of[layer]
        if len(orphans) > num_spare + num_donor:
            missing = len(orphans) - num_spare - num_donor
            if not allow_uncovered:
                raise InsufficientSlotsError(layer, orphans, missing, num_spare + num_donor)
            orphans, uncovered[layer] = orphans[:num_spare + num_donor], orphans[num_spare + num_donor:]
            num_missing_slots = max(num_missing_slots, missing)
        donors = _DonorQueue(counts, new_p2l[layer].tolist()) if len(orphans) > num_spare else None

        cursor = layer % len(active_ranks)
        for orphan in orphans:
            old = NO_EXPERT
            if num_spare:
                phys = _take_spare(spare_by_rank, active_ranks, cursor)
                num_spare -= 1
            else:
                phys, old = donors.take(position, slots, cursor)
            rank = phys // slots
            assignments.append(SlotAssignment(layer, phys, rank, orphan, old))
            cursor = (position[rank] + 1) % len(active_ranks)
    if assignments:
        index = torch.tensor([(a.layer, a.phys_slot, a.logical_expert_id) for a in assignments], dtype=torch.int64)
        new_p2l[index[:, 0], index[:, 1]] = index[:, 2]

    new_placement = ExpertPlacement.from_phys_to_logical(
        new_p2l, num_ranks=placement.num_ranks, slots_per_rank=slots, num_experts=num_experts)
    return CoverageRepair(placement, new_placement, membership.epoch, assignments, num_dropped, uncovered,
                          num_missing_slots)


def _round_robin(active_ranks: list[int], cursor: int):
    n = len(active_ranks)
    return (active_ranks[(cursor + i) % n] for i in range(n))


def _take_spare(spare_by_rank: dict[int, list[int]], active_ranks: list[int], cursor: int) -> int:
    for rank in _round_robin(active_ranks, cursor):
        if spare_by_rank.get(rank):
            return spare_by_rank[rank].pop(0)
    raise AssertionError("caller counted a spare slot that does not exist")


class _DonorQueue:
    """Replicas that may be given up: always of the expert with the most replicas (ties: lowest id)."""

    def __init__(self, counts: list[int], live_row: list[int]):
        self.counts = list(counts)
        self.heap = [(-c, e) for e, c in enumerate(self.counts) if c > 1]
        heapq.heapify(self.heap)
        # each expert's live replicas in ascending slot order (the row has dead slots emptied already)
        self.slots_of: dict[int, list[int]] = {}
        for phys, expert in enumerate(live_row):
            if expert != NO_EXPERT and self.counts[expert] > 1:
                self.slots_of.setdefault(expert, []).append(phys)

    def take(self, position: dict[int, int], slots: int, cursor: int) -> tuple[int, int]:
        """Returns ``(phys_slot, donor_expert)``: the donor's replica on the first survivor in
        round-robin order from ``cursor`` (``position``: survivor rank -> its place in that order)."""
        neg_count, donor = heapq.heappop(self.heap)
        held = self.slots_of[donor]
        if len(held) == 1:
            phys = held[0]
        else:  # at most one replica per rank: the nearest rank after the cursor holds it
            n = len(position)
            phys = min(held, key=lambda p: (position[p // slots] - cursor) % n)
        held.remove(phys)
        self.counts[donor] -= 1
        if self.counts[donor] > 1:
            heapq.heappush(self.heap, (neg_count + 1, donor))
        return phys, donor
