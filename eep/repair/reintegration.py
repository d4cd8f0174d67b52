"""Reintegration: give a repaired rank back its share of the experts.

The rejoining rank's slots are filled, one slot at a time, with the expert of highest load per
replica that the rank does not hold yet (uniform load: the experts with the fewest replicas,
which are the ones repair left short). Survivors keep every slot they have, so no healthy rank
rewrites a weight; they only serve as copy sources, and their only change is one table write at
a step boundary.

The transfers come from surviving replicas over the peer links, spread over source ranks, and
are batched (one batch per layer by default) so serving continues between batches; the rank
stays out of the routing tables until the final switch.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from eep.repair.bandwidth import Bandwidth
from eep.repair.plan import (ExecutionReport, ExpertBytes, RepairExecutor, ReplicaChooser, Transfer, _nbytes_function,
                             predict_transfers, run_transfers)
from eep.repair.tiers import HOST, PEER, ExpertSource, tier_order
from eep.state import NO_EXPERT, ExpertPlacement, Membership


@dataclass
class ReintegrationPlan:
    ranks: list[int]  # the rejoining ranks, ascending
    epoch: int  # the epoch in which they are active again
    old_placement: ExpertPlacement
    placement: ExpertPlacement
    transfers: list[Transfer]
    batches: list[list[Transfer]]
    bandwidth: Bandwidth
    predicted_s: float

    @property
    def rank(self) -> int:
        """The rejoining rank, when there is one."""
        if len(self.ranks) != 1:
            raise ValueError(f"this plan brings back ranks {self.ranks}, not one")
        return self.ranks[0]

    def execute(self, executor: RepairExecutor) -> ExecutionReport:
        """Stage every batch, then switch the maps (and membership) in one commit."""
        return run_transfers(executor, self.transfers, self.placement, self.epoch)


def plan_reintegration(placement: ExpertPlacement, membership: Membership, rank: int | Iterable[int],
                       load: torch.Tensor | None = None, *, tiers: Sequence[ExpertSource] | None = None,
                       bandwidth: Bandwidth | None = None, expert_nbytes: ExpertBytes | None = None,
                       layer_ids: Sequence[int] | None = None, batch_layers: int = 1) -> ReintegrationPlan:
    """Placement and transfers that bring ``rank`` back, leaving every survivor's slots as they are.

    Parameters:
        placement: the maps in force now (``rank`` holds nothing).
        membership: the membership now (``rank`` inactive).
        rank: one rank, or several that rejoin together: their slots are filled in ascending rank
            order, each seeing the replicas the earlier ones took, and copy only from ranks active
            in ``membership`` (a co-joiner's slots are not filled yet).
        load: ``[num_layers, num_experts]`` recent token counts; ``None`` means uniform.
        tiers: used only for an expert with no live replica (an instance that lost coverage: such
            experts rank first, so a rejoin restores coverage before it adds redundancy).
        batch_layers: layers per transfer batch.
    """
    ranks = [rank] if isinstance(rank, int) else sorted(set(int(r) for r in rank))
    if not ranks:
        raise ValueError("plan_reintegration needs at least one rank")
    for r in ranks:
        membership.check_join(r)
    bandwidth = bandwidth or Bandwidth()
    tiers = tier_order(list(tiers or []))
    slots = placement.slots_per_rank
    layer_ids = list(range(placement.num_layers)) if layer_ids is None else list(layer_ids)
    nbytes_of = _nbytes_function(expert_nbytes, tiers)
    load = torch.ones(placement.num_layers, placement.num_experts, dtype=torch.float64) if load is None \
        else torch.as_tensor(load, dtype=torch.float64).expand(placement.num_layers, -1)

    num_layers, num_experts = placement.num_layers, placement.num_experts
    new_p2l = placement.phys_to_logical.clone()
    for r in ranks:
        new_p2l[:, r * slots:(r + 1) * slots] = NO_EXPERT  # whatever a dead rank held is gone
    slot_active = membership.active_cpu.repeat_interleave(slots)  # co-joiners are not active yet: no source
    # live replicas per expert, every layer at once (tensor ops; the choices below are sequential)
    key = torch.where((new_p2l != NO_EXPERT) & slot_active, new_p2l, num_experts)
    live_counts = torch.zeros(num_layers, num_experts + 1, dtype=torch.int64).scatter_add_(
        1, key, torch.ones_like(key))[:, :num_experts].tolist()
    replicas = placement.logical_to_phys[:, :, :max(1, int(placement.replica_count.max()))]
    slot_is_active = slot_active.tolist()
    rows = new_p2l.tolist()
    picks = []  # (layer, joiner, local slot, expert) in the order they were chosen
    for layer, load_row in enumerate(load.tolist()):
        chooser = ReplicaChooser(load_row, live_counts[layer])
        for r in ranks:
            chosen: set[int] = set()
            for local in range(min(slots, num_experts)):
                expert = chooser.take(chosen)
                chosen.add(expert)
                picks.append((layer, r, local, expert))
    listed_all = replicas[[p[0] for p in picks], [p[3] for p in picks]].tolist() if picks else []
    transfers: list[Transfer] = []
    source_use: dict[int, int] = defaultdict(int)  # spread the peer reads over the source ranks
    for (layer, r, local, expert), listed in zip(picks, listed_all):
        ckpt, phys = layer_ids[layer], r * slots + local
        sources = [p for p in listed if p != NO_EXPERT and slot_is_active[p]]
        if sources:
            src = min(sources, key=lambda p: (source_use[p // slots], p))
            source_use[src // slots] += 1
            transfer = Transfer(layer, ckpt, expert, PEER, src // slots, src, r, phys, nbytes_of(ckpt, expert))
        else:  # no live replica (only in an instance that lost coverage): the fastest tier that has it
            tier = next((t for t in tiers if t.has_expert(ckpt, expert)), None)
            transfer = Transfer(layer, ckpt, expert, tier.name if tier else HOST, None, None, r, phys,
                                nbytes_of(ckpt, expert))
        transfers.append(transfer)
        rows[layer][phys] = expert
    new_p2l = torch.tensor(rows, dtype=torch.int64)

    new_placement = ExpertPlacement.from_phys_to_logical(new_p2l, num_ranks=placement.num_ranks,
                                                         slots_per_rank=slots, num_experts=placement.num_experts)
    transfers, predicted_s = predict_transfers(transfers, bandwidth)
    batches = [[t for t in transfers if start <= t.layer < start + batch_layers]
               for start in range(0, placement.num_layers, batch_layers)]
    return ReintegrationPlan(ranks, membership.epoch + 1, placement, new_placement, transfers,
                             [b for b in batches if b], bandwidth, predicted_s)
