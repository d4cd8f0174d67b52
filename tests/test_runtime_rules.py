"""The runtime plans every commit with the repair planner (``eep/runtime/control/rules.py``).

No processes here: the rules are pure functions of (maps, membership, configuration), which is what
lets every survivor recompute the coordinator's plan and compare it with the commit.
"""

import json
import subprocess
import sys

import pytest

from eep import InsufficientSlotsError, Membership, check_validity, plan_reintegration, plan_repair
from eep.runtime import RuntimeConfig
from eep.runtime.control.rules import ORPHAN_RESTORE, REINTEGRATION, ROUTING_ONLY, CommitPlan, RepairRules


def _rules(**overrides) -> RepairRules:
    return RepairRules(RuntimeConfig(**{"num_ranks": 4, **overrides}))


def test_a_failure_is_planned_by_plan_repair_critical_phase_only():
    rules = _rules()
    active = [True] * 4
    plan = rules.plan_commit(rules.initial, active, failed=[2], joined=[], epoch=1)
    before = Membership(4, epoch=0)
    want = plan_repair(rules.initial, before, before.after_failure(2), rules.tiers, rules.bandwidth,
                       expert_nbytes=rules.expert_nbytes, rereplicate=False)
    assert plan.placement.equal(want.placement) and plan.transfers == want.restores
    assert plan.is_valid and check_validity(Membership(4, active=[True, True, False, True]), plan.placement).ok
    assert [p["phase"] for p in plan.phases] == [ROUTING_ONLY, ORPHAN_RESTORE]
    assert plan.phases[1]["predicted_s"] == want.predicted_pause_s and want.predicted_pause_s > 0
    assert all(t.source_tier == "host" and t.dst_rank != 2 for t in plan.transfers)
    assert plan.predicted_s_for(plan.transfers[0].dst_rank) > 0


def test_a_join_is_planned_by_plan_reintegration_and_the_preload_is_that_row():
    rules = _rules()
    failed = rules.plan_commit(rules.initial, [True] * 4, failed=[1], joined=[], epoch=1)
    after = [True, False, True, True]
    join = rules.plan_commit(failed.placement, after, failed=[], joined=[1], epoch=2)
    want = plan_reintegration(failed.placement, Membership(4, active=after), 1, tiers=rules.tiers,
                              bandwidth=rules.bandwidth, expert_nbytes=rules.expert_nbytes)
    assert join.placement.equal(want.placement) and join.transfers == want.transfers
    assert [p["phase"] for p in join.phases] == [REINTEGRATION] and join.is_valid
    # survivors keep every slot; the joiner's slots are filled from survivors' replicas
    s = rules.cfg.slots_per_rank
    for r in (0, 2, 3):
        assert (join.placement.phys_to_logical[:, r * s:(r + 1) * s] ==
                failed.placement.phys_to_logical[:, r * s:(r + 1) * s]).all()
    assert all(t.dst_rank == 1 and t.source_tier == "peer" and t.source_rank in (0, 2, 3) for t in join.transfers)
    # what a restarted rank copies before asking to join is the join's row, from the same peers
    preload = rules.preload((1, failed.placement, after), 1)
    assert (preload.placement.phys_to_logical[:, s:2 * s] == join.placement.phys_to_logical[:, s:2 * s]).all()
    assert preload.epoch == 1 and preload.transfers == join.transfers
    # at the start (or before its failure is committed) it loads its initial row from the fastest tier
    for latest in (None, (3, failed.placement, [True] * 4)):
        start = rules.preload(latest, 1)
        assert start.placement.equal(rules.initial) and start.epoch == (-1 if latest is None else 3)
        row = rules.initial.phys_to_logical[:, s:2 * s]
        assert sorted((t.layer, t.dst_slot, t.logical_expert_id) for t in start.transfers) == sorted(
            (layer, s + i, int(row[layer, i])) for layer in range(row.shape[0]) for i in range(s) if row[layer, i] >= 0)
        assert {t.source_tier for t in start.transfers} == {"host"} and start.predicted_s_for(1) > 0


def test_three_of_four_lost_commits_an_epoch_that_does_not_serve_and_a_rejoin_restores_it():
    rules = _rules()  # 16 experts, 4 ranks x 8 slots: one rank cannot hold them all
    lost = rules.plan_commit(rules.initial, [True] * 4, failed=[1, 2, 3], joined=[], epoch=1)
    assert not lost.is_valid and lost.num_missing_slots == 8
    for layer, experts in lost.uncovered.items():
        assert len(experts) == 8 and rules.initial.num_experts - len(experts) == rules.cfg.slots_per_rank
    # the survivor's spare slots took orphans (as many as fit) before the rest were listed
    assert lost.transfers and all(t.dst_rank == 0 for t in lost.transfers)
    text = lost.describe_uncovered()
    assert "layer 0: experts [" in text and "8 more expert slots per layer are needed (a rank has 8)" in text
    wire = json.loads(json.dumps(lost.to_wire()))
    assert wire["valid"] is False and CommitPlan.from_wire(1, lost.placement, wire).to_wire() == wire
    back = rules.plan_commit(lost.placement, [True, False, False, False], failed=[], joined=[3], epoch=2)
    assert back.is_valid, back.uncovered
    # the joiner took the uncovered experts first, from the tier (no member holds them)
    from_tier = {(t.layer, t.logical_expert_id) for t in back.transfers if t.source_tier == "host"}
    assert from_tier == {(layer, e) for layer, experts in lost.uncovered.items() for e in experts}


def test_failure_and_join_in_one_commit_and_a_start_after_every_member_died():
    rules = _rules()
    first = rules.plan_commit(rules.initial, [True] * 4, failed=[2], joined=[], epoch=1)
    both = rules.plan_commit(first.placement, [True, True, False, True], failed=[0], joined=[2], epoch=2)
    assert both.is_valid and [p["phase"] for p in both.phases][-1] == REINTEGRATION
    assert check_validity(Membership(4, active=[False, True, True, True]), both.placement).ok
    assert not any(t.source_rank == 0 for t in both.transfers)  # nothing copies from the rank that failed
    start = rules.plan_start([True, True, False, False], epoch=5)
    assert check_validity(Membership(4, active=[True, True, False, False]), start.placement).ok
    with pytest.raises(InsufficientSlotsError):
        rules.plan_start([False, True, False, False], epoch=5)


_CHILD = """
import json
from eep.runtime import RuntimeConfig
from eep.runtime.control.rules import RepairRules
rules = RepairRules(RuntimeConfig(num_ranks=6, slots_per_rank=5, num_redundant=6))
a = rules.plan_commit(rules.initial, [True] * 6, failed=[1, 4], joined=[], epoch=1)
b = rules.plan_commit(a.placement, [True, False, True, True, False, True], failed=[3], joined=[1], epoch=2)
print(json.dumps([a.to_wire(), a.placement.to_dict(), b.to_wire(), b.placement.to_dict()], sort_keys=True))
"""


def test_every_process_computes_the_same_plan():
    outs = [subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, check=True,
                           timeout=120).stdout for _ in range(2)]
    assert outs[0] == outs[1] and json.loads(outs[0])[0]["transfers"]
