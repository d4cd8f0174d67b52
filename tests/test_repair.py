import itertools
import json
import subprocess
import sys

import pytest
import torch

from eep import (NO_EXPERT, ExpertPlacement, InsufficientSlotsError, Membership, check_validity,
                 repair_coverage)

# (num_ranks, slots_per_rank, num_experts, num_redundant): with and without redundancy and spares
CONFIGS = [(4, 6, 16, 4), (4, 5, 16, None), (4, 4, 16, None), (8, 3, 16, 4), (8, 4, 24, None)]


def _orphans(p: ExpertPlacement, m: Membership, layer: int) -> list[int]:
    s = p.slots_per_rank
    return [e for e in range(p.num_experts) if not any(m.is_active(x // s) for x in p.replicas(layer, e))]


@pytest.mark.parametrize("num_ranks, slots, experts, redundant", CONFIGS)
@pytest.mark.parametrize("num_failed", [1, 2])
def test_every_single_and_double_failure_repairs_or_says_how_many_slots_are_missing(
        num_ranks, slots, experts, redundant, num_failed):
    load = torch.rand(2, experts, generator=torch.Generator().manual_seed(num_ranks * 100 + slots))
    p = ExpertPlacement.build(2, experts, num_ranks, slots, load, num_redundant=redundant)
    for failed in itertools.combinations(range(num_ranks), num_failed):
        m = Membership(num_ranks)
        m.fail(list(failed))
        live_slots = (num_ranks - num_failed) * slots
        if live_slots < experts:
            with pytest.raises(InsufficientSlotsError, match="more slots are needed") as info:
                repair_coverage(p, m)
            assert info.value.num_missing > 0
            continue
        repair = repair_coverage(p, m)
        new = repair.placement
        assert check_validity(m, new).ok, (failed, check_validity(m, new))
        # routing-only when nothing was orphaned; else exactly the orphans were assigned
        orphans = {(layer, e) for layer in range(2) for e in _orphans(p, m, layer)}
        assert {(a.layer, a.logical_expert_id) for a in repair.assignments} == orphans
        assert repair.is_routing_only == (not orphans)
        for a in repair.assignments:
            assert m.is_active(a.rank) and int(new.phys_to_logical[a.layer, a.phys_slot]) == a.logical_expert_id
        # survivors' other slots are untouched
        changed = {(a.layer, a.phys_slot) for a in repair.assignments}
        for layer in range(2):
            for phys in range(p.num_phys_slots):
                if m.is_active(phys // slots) and (layer, phys) not in changed:
                    assert new.phys_to_logical[layer, phys] == p.phys_to_logical[layer, phys]
                if not m.is_active(phys // slots):
                    assert new.phys_to_logical[layer, phys] == NO_EXPERT


def test_spare_slots_are_used_before_donors_and_spread_over_ranks():
    p = ExpertPlacement.build(1, 16, 4, 6, num_redundant=4)  # 4 spare slots
    m = Membership(4)
    m.fail(1)
    repair = repair_coverage(p, m)
    assert all(a.old_logical_expert_id == NO_EXPERT for a in repair.assignments)
    assert len({a.rank for a in repair.assignments}) == len(repair.assignments)


def test_donor_slots_come_from_the_most_replicated_expert():
    p = ExpertPlacement.build(1, 16, 4, 6)  # no spare slots, 8 redundant replicas
    m = Membership(4)
    m.fail(0)
    repair = repair_coverage(p, m)
    assert repair.assignments and all(a.old_logical_expert_id != NO_EXPERT for a in repair.assignments)
    assert check_validity(m, repair.placement).ok


def test_repair_is_pure():
    p = ExpertPlacement.build(2, 16, 4, 6)
    before = p.phys_to_logical.clone()
    m = Membership(4)
    m.fail(2)
    repair_coverage(p, m)
    assert torch.equal(p.phys_to_logical, before)


_CHILD = """
import json, sys, torch
from eep import ExpertPlacement, Membership, repair_coverage
torch.manual_seed(int(sys.argv[1]))  # different global RNG state in each process must not matter
p = ExpertPlacement.build(4, 64, 8, 12, torch.arange(256.0).reshape(4, 64) % 17)
m = Membership(8); m.fail([2, 5])
print(json.dumps(repair_coverage(p, m).placement.to_dict()))
"""


def test_repair_is_identical_across_processes():
    outs = [subprocess.run([sys.executable, "-c", _CHILD, str(seed)], capture_output=True, text=True,
                           check=True, timeout=120).stdout for seed in (1, 2)]
    assert outs[0] == outs[1]
    assert json.loads(outs[0])["num_ranks"] == 8
