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
     slots are missing. Nothing is applied in that case (the function is pure).
"""

from __future__ import annotations

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

    @property
    def is_routing_only(self) -> bool:
        return not self.assignments


def repair_coverage(placement: ExpertPlacement, membership: Membership) -> CoverageRepair:
    """New placement in which every logical expert has a replica on an active rank.

    Parameters:
        placement: the maps before the change (not modified).
        membership: the membership after the change.
    Returns:
        ``CoverageRepair`` with the new placement and the slot assignments whose weights must be
        restored (from a peer replica, host memory or disk: the repair planner decides).
    Raises:
        InsufficientSlotsError: a layer has more orphans than spare plus donor slots.
    """
    if membership.num_ranks != placement.num_ranks:
        raise PlacementError(f"membership has {membership.num_ranks} rank slots, placement {placement.num_ranks}")
    active = membership.active_cpu.tolist()
    active_ranks = [r for r, a in enumerate(active) if a]
    slots = placement.slots_per_rank
    new_p2l = placement.phys_to_logical.clone()
    assignments: list[SlotAssignment] = []
    num_dropped = 0

    for layer in range(placement.num_layers):
        # 0. Forget everything on dead ranks.
        row = new_p2l[layer].tolist()
        for phys, expert in enumerate(row):
            if not active[phys // slots] and expert != NO_EXPERT:
                num_dropped += 1
                row[phys] = NO_EXPERT
        counts = [0] * placement.num_experts
        for expert in row:
            if expert != NO_EXPERT:
                counts[expert] += 1
        orphans = [e for e in range(placement.num_experts) if counts[e] == 0]
        if not orphans:
            new_p2l[layer] = torch.tensor(row, dtype=torch.int64)
            continue

        num_spare = sum(1 for r in active_ranks for i in range(slots) if row[r * slots + i] == NO_EXPERT)
        num_donor = sum(c - 1 for c in counts if c > 1)
        if len(orphans) > num_spare + num_donor:
            raise InsufficientSlotsError(layer, orphans, len(orphans) - num_spare - num_donor, num_spare + num_donor)

        cursor = layer % len(active_ranks)
        for orphan in orphans:
            phys = _take_spare(row, active_ranks, slots, cursor)
            if phys is None:
                phys = _take_donor(row, counts, active_ranks, slots, cursor)
            old = row[phys]
            if old != NO_EXPERT:
                counts[old] -= 1
            row[phys] = orphan
            counts[orphan] = 1
            rank = phys // slots
            assignments.append(SlotAssignment(layer, phys, rank, orphan, old))
            cursor = (active_ranks.index(rank) + 1) % len(active_ranks)
        new_p2l[layer] = torch.tensor(row, dtype=torch.int64)

    new_placement = ExpertPlacement.from_phys_to_logical(
        new_p2l, num_ranks=placement.num_ranks, slots_per_rank=slots, num_experts=placement.num_experts)
    return CoverageRepair(placement, new_placement, membership.epoch, assignments, num_dropped)


def _round_robin(active_ranks: list[int], cursor: int) -> list[int]:
    return active_ranks[cursor:] + active_ranks[:cursor]


def _take_spare(row: list[int], active_ranks: list[int], slots: int, cursor: int) -> int | None:
    for rank in _round_robin(active_ranks, cursor):
        for i in range(slots):
            if row[rank * slots + i] == NO_EXPERT:
                return rank * slots + i
    return None


def _take_donor(row: list[int], counts: list[int], active_ranks: list[int], slots: int, cursor: int) -> int:
    donor = max((e for e, c in enumerate(counts) if c > 1), key=lambda e: (counts[e], -e))
    for rank in _round_robin(active_ranks, cursor):
        for i in range(slots):
            if row[rank * slots + i] == donor:
                return rank * slots + i
    raise AssertionError(f"donor expert {donor} has {counts[donor]} replicas but none on an active rank")
