"""Carries out repair plans on the simulated ranks of ``ExpertParallelMoE``.

A slot that serves nothing right now (spare, or on a rank outside the current routing) is
written directly: no route reads it until the map switch. A slot that still serves (a donor
replica) is staged in a side buffer and overwritten only by ``commit``. So a corrupt shard or a
missing expert half-way leaves every serving slot and the maps exactly as they were.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from eep.fp8 import empty_like_weight
from eep.repair import ExpertSource, RepairError, RepairExecutor, Transfer
from eep.state import NO_EXPERT, ExpertPlacement, Membership

if TYPE_CHECKING:
    from eep.reference.moe import ExpertParallelMoE


class ReferenceExecutor(RepairExecutor):
    """Executor over one ``ExpertParallelMoE``; commits ``new_membership`` together with the maps."""

    def __init__(self, moe: "ExpertParallelMoE", new_membership: Membership, tiers: Sequence[ExpertSource]):
        self.moe = moe
        self.new_membership = new_membership
        self.epoch = new_membership.epoch
        self.tiers = list(tiers)
        self.staged: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.written_in_place: list[int] = []

    def stage(self, transfer: Transfer, tier: ExpertSource | None) -> float:
        moe = self.moe
        start = time.perf_counter()
        dst = transfer.dst_slot
        if self._serves(dst):
            weights = (empty_like_weight(moe.slot_w_gate[dst]), empty_like_weight(moe.slot_w_up[dst]),
                       empty_like_weight(moe.slot_w_down[dst]))
            self.staged[dst] = weights
        else:
            weights = (moe.slot_w_gate[dst], moe.slot_w_up[dst], moe.slot_w_down[dst])
            self.written_in_place.append(dst)
        if tier is None:  # peer replica: read the live source slot
            src = transfer.source_slot
            if src is None or not self.new_membership.is_active(src // moe.slots_per_rank):
                raise RepairError(f"peer source slot {src} is not on an active rank")
            for w, slot_w in zip(weights, (moe.slot_w_gate, moe.slot_w_up, moe.slot_w_down)):
                w.copy_(slot_w[src])
        else:
            tier.copy_expert_into(transfer.checkpoint_layer, transfer.logical_expert_id, *weights)
        return time.perf_counter() - start

    def _serves(self, phys: int) -> bool:
        moe = self.moe
        return (int(moe.placement.phys_to_logical[0, phys]) != NO_EXPERT
                and moe.membership.is_active(phys // moe.slots_per_rank))

    def commit(self, placement: ExpertPlacement, epoch: int) -> None:
        moe = self.moe
        for phys, (w_gate, w_up, w_down) in self.staged.items():
            moe.slot_w_gate[phys].copy_(w_gate)
            moe.slot_w_up[phys].copy_(w_up)
            moe.slot_w_down[phys].copy_(w_down)
        self.staged.clear()
        self.written_in_place.clear()
        s = moe.slots_per_rank
        for rank in range(moe.num_ranks):
            if not self.new_membership.is_active(rank):
                moe.poison_slots(range(rank * s, (rank + 1) * s))
        moe.membership.copy_from(self.new_membership)
        moe.placement.copy_(placement)

    def discard(self) -> None:
        self.staged.clear()
        self.moe.poison_slots(self.written_in_place)  # they served nothing before; make sure of it
        self.written_in_place.clear()
