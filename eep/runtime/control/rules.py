"""The deterministic rules every participant applies to a decision, so no maps are exchanged.

A commit names the ranks that ``failed`` and the ranks that ``joined``; the new placement is
then a pure function of the old one:

1. failures first: ``eep.repair_coverage(old_placement, membership without the failed ranks)``;
2. then joins: each joining rank takes back the row the *initial* placement gave it (survivors
   keep their repaired slots, so no healthy rank copies anything), as
   ``eep.reference.ExpertParallelMoE.join`` does.

The coordinator computes it to publish; every survivor recomputes it and checks it against the
commit; only a joining rank, which has no history, takes it from the (authenticated) commit.
"""

from __future__ import annotations

from collections.abc import Iterable

from eep.state import ExpertPlacement, Membership, repair_coverage


def initial_placement(num_layers: int, num_experts: int, num_ranks: int, slots_per_rank: int,
                      num_redundant: int) -> ExpertPlacement:
    return ExpertPlacement.build(num_layers, num_experts, num_ranks, slots_per_rank, num_redundant=num_redundant)


def next_placement(old: ExpertPlacement, old_active: list[bool], failed: Iterable[int], joined: Iterable[int],
                   initial: ExpertPlacement, epoch: int) -> ExpertPlacement:
    failed, joined = sorted(set(failed)), sorted(set(joined))
    placement = old
    if failed:
        mask = [a and r not in failed for r, a in enumerate(old_active)]
        placement = repair_coverage(old, Membership(len(mask), active=mask, epoch=epoch)).placement
    if joined:
        s = old.slots_per_rank
        p2l = placement.phys_to_logical.clone()
        for rank in joined:
            p2l[:, rank * s:(rank + 1) * s] = initial.phys_to_logical[:, rank * s:(rank + 1) * s]
        placement = ExpertPlacement.from_phys_to_logical(p2l, num_ranks=old.num_ranks, slots_per_rank=s,
                                                         num_experts=old.num_experts)
    return placement
