import itertools
import json
import subprocess
import sys

import pytest
import torch

from eep_test_utils import random_experts
from eep import ExpertPlacement, InsufficientSlotsError, Membership, check_validity
from eep.reference import ExpertParallelMoE, dense_moe
from eep.repair import (Bandwidth, RepairError, StepKind, TensorTier, plan_reintegration, plan_repair)

EXPERT_NBYTES = 3 * 2048 * 768 * 2  # one qwen3-30b-a3b expert in bf16

# (num_ranks, slots_per_rank, num_experts, num_redundant)
CONFIGS = [(4, 4, 16, None), (4, 6, 16, 4), (8, 2, 16, None), (8, 3, 16, 4), (16, 2, 24, None), (16, 3, 32, 0)]


def _uniform_tiers(num_layers, num_experts):
    """Host tier with every expert (weights irrelevant here: the planner only asks has_expert)."""
    w = torch.zeros(num_experts, 1, 1)
    return [TensorTier({layer: (w, w, w) for layer in range(num_layers)})]


@pytest.mark.parametrize("num_ranks, slots, experts, redundant", CONFIGS)
def test_every_single_and_double_failure_plans_validly_or_says_not_enough_slots(num_ranks, slots, experts, redundant):
    p = ExpertPlacement.build(2, experts, num_ranks, slots, num_redundant=redundant)
    tiers = _uniform_tiers(2, experts)
    for failed in itertools.chain(itertools.combinations(range(num_ranks), 1),
                                  itertools.combinations(range(num_ranks), 2)):
        before = Membership(num_ranks)
        after = before.after_failure(list(failed))
        if (num_ranks - len(failed)) * slots < experts:
            with pytest.raises(InsufficientSlotsError):
                plan_repair(p, before, after, tiers, expert_nbytes=EXPERT_NBYTES)
            continue
        plan = plan_repair(p, before, after, tiers, expert_nbytes=EXPERT_NBYTES)
        assert check_validity(after, plan.placement).ok
        assert check_validity(after, plan.final_placement).ok
        if plan.is_routing_only:
            assert plan.restore_nbytes == 0 and plan.predicted_pause_s == 0.0
            assert StepKind.ORPHAN_RESTORE not in plan.steps
        else:
            assert all(t.source_tier == "host" and after.is_active(t.dst_rank) for t in plan.restores)
            assert plan.predicted_pause_s > 0
        for t in plan.rereplications:
            assert t.source_tier == "peer" and after.is_active(t.source_rank) and t.source_rank != t.dst_rank


def test_redundant_placement_survives_single_failures_by_routing_alone():
    # every expert on two ranks: any single failure is routing-only
    p = ExpertPlacement.build(3, 8, 4, 4)
    assert (p.replica_count == 2).all()
    for rank in range(4):
        before = Membership(4)
        plan = plan_repair(p, before, before.after_failure(rank))
        assert plan.is_routing_only and plan.steps == [StepKind.ROUTING_ONLY] and plan.restore_nbytes == 0


def test_contention_model_shares_links():
    bw = Bandwidth(peer_gbps=100.0, h2d_gbps=10.0, disk_gbps=1.0, source="config")
    p = ExpertPlacement.build(1, 8, 4, 3, num_redundant=0)  # no redundancy: rank death orphans 2 experts
    before = Membership(4)
    nbytes = 10**9
    host_plan = plan_repair(p, before, before.after_failure(0), _uniform_tiers(1, 8), bw, expert_nbytes=nbytes)
    per_rank = {}
    for t in host_plan.restores:
        per_rank[t.dst_rank] = per_rank.get(t.dst_rank, 0) + 1
    assert host_plan.predicted_pause_s == pytest.approx(max(per_rank.values()) * nbytes / 10e9)
    disk = TensorTier(_uniform_tiers(1, 8)[0].weights_by_layer, name="disk")
    disk_plan = plan_repair(p, before, before.after_failure(0), [disk], bw, expert_nbytes=nbytes, rereplicate=False)
    assert disk_plan.predicted_pause_s == pytest.approx(2 * nbytes / 1e9)  # the shared disk is the bottleneck
    assert disk_plan.nbytes_by_tier() == {"disk": 2 * nbytes}


_CHILD = """
import json, sys, torch
from eep import ExpertPlacement, Membership
from eep.repair import plan_repair, TensorTier
torch.manual_seed(int(sys.argv[1]))
p = ExpertPlacement.build(6, 64, 16, 6, torch.arange(384.0).reshape(6, 64) % 13, num_redundant=8)
w = torch.zeros(64, 1, 1)
before = Membership(16)
plan = plan_repair(p, before, before.after_failure([3, 11]), [TensorTier({l: (w, w, w) for l in range(6)})],
                   expert_nbytes=1 << 20, load=torch.arange(384.0).reshape(6, 64) % 7)
print(json.dumps(plan.to_dict(), sort_keys=True))
"""


def test_plans_are_identical_across_processes():
    outs = [subprocess.run([sys.executable, "-c", _CHILD, str(seed)], capture_output=True, text=True,
                           check=True, timeout=120).stdout for seed in (1, 2)]
    assert outs[0] == outs[1]
    plan = json.loads(outs[0])
    assert plan["restores"] and plan["rereplications"]


@pytest.mark.parametrize("num_ranks, slots", [(4, 6), (8, 3)])
def test_executed_repair_and_reintegration_keep_outputs_equal_to_the_dense_oracle(num_ranks, slots):
    gen = torch.Generator().manual_seed(num_ranks)
    w = random_experts(16, 16, 32, generator=gen)
    x, logits = torch.randn(40, 32, generator=gen), torch.randn(40, 16, generator=gen)
    oracle = dense_moe(x, *w, router_logits=logits, top_k=4)
    for failed in itertools.combinations(range(num_ranks), 2):
        if (num_ranks - 2) * slots < 16:
            continue
        moe = ExpertParallelMoE(*w, num_ranks=num_ranks, slots_per_rank=slots, top_k=4, num_redundant=4)
        moe.fail(list(failed), rereplicate=True)
        assert moe.validity().ok
        torch.testing.assert_close(moe(x, logits), oracle, rtol=1e-5, atol=1e-6)
        for rank in failed:
            moe.join(rank)
        assert moe.validity().ok
        torch.testing.assert_close(moe(x, logits), oracle, rtol=1e-5, atol=1e-6)


def test_reintegration_returns_the_placement_to_balance_without_touching_survivors():
    p = ExpertPlacement.build(4, 16, 4, 6)
    assert int(p.replica_count.max() - p.replica_count.min()) <= 1
    before = Membership(4)
    after = before.after_failure(2)
    repaired = plan_repair(p, before, after, _uniform_tiers(4, 16), expert_nbytes=EXPERT_NBYTES).placement
    plan = plan_reintegration(repaired, after, 2, expert_nbytes=EXPERT_NBYTES)
    new = plan.placement
    assert check_validity(Membership(4), new).ok
    assert int(new.replica_count.max() - new.replica_count.min()) <= 1
    survivors = [r for r in range(4) if r != 2]
    for r in survivors:
        assert torch.equal(new.phys_to_logical[:, r * 6:(r + 1) * 6], repaired.phys_to_logical[:, r * 6:(r + 1) * 6])
    assert all(t.source_tier == "peer" and t.dst_rank == 2 and t.source_rank in survivors for t in plan.transfers)
    assert len(plan.batches) == 4 and sum(len(b) for b in plan.batches) == len(plan.transfers) == 24


def test_reintegration_favours_hot_experts():
    p = ExpertPlacement.build(1, 8, 4, 3, num_redundant=0)
    before = Membership(4)
    after = before.after_failure(1)
    repaired = plan_repair(p, before, after, _uniform_tiers(1, 8), expert_nbytes=1).placement
    load = torch.tensor([[1.0, 1, 1, 90, 1, 50, 1, 1]])
    plan = plan_reintegration(repaired, after, 1, load, expert_nbytes=1)
    assert {3, 5} <= set(plan.placement.experts_on_rank(0, 1))


class _CorruptTier(TensorTier):
    def copy_expert_into(self, layer, expert, *dst, stream=None):
        raise OSError(f"shard for layer {layer} expert {expert}: sha256 mismatch")


def test_corrupt_tier_falls_back_to_the_next_one():
    gen = torch.Generator().manual_seed(3)
    w = random_experts(8, 8, 16, generator=gen)
    good = TensorTier({0: w}, name="disk")
    bad = _CorruptTier({0: w}, name="host")
    moe = ExpertParallelMoE(*w, num_ranks=4, slots_per_rank=3, top_k=2, num_redundant=0, tiers=[bad, good])
    plan = moe.fail(1)
    assert plan.restores and all(t.source_tier == "host" for t in plan.restores)
    assert set(moe.last_report.served_by) == {"disk"}
    assert moe.last_report.fallbacks and "sha256 mismatch" in moe.last_report.fallbacks[0]
    x, logits = torch.randn(16, 16, generator=gen), torch.randn(16, 8, generator=gen)
    torch.testing.assert_close(moe(x, logits), dense_moe(x, *w, router_logits=logits, top_k=2))


def test_every_tier_corrupt_applies_nothing():
    gen = torch.Generator().manual_seed(4)
    w = random_experts(8, 8, 16, generator=gen)
    moe = ExpertParallelMoE(*w, num_ranks=4, slots_per_rank=3, top_k=2, num_redundant=0,
                            tiers=[_CorruptTier({0: w}, name="host"), _CorruptTier({0: w}, name="disk")])
    before = (moe.membership.epoch, moe.placement.clone(), moe.slot_w_gate.clone())
    with pytest.raises(RepairError, match="no tier could restore layer 0 expert"):
        moe.fail(1)
    assert moe.membership.epoch == before[0] and moe.placement.equal(before[1])
    assert torch.equal(moe.slot_w_gate.nan_to_num(7.0), before[2].nan_to_num(7.0))


def test_tier_lacking_an_expert_and_no_tiers_are_clear_errors():
    p = ExpertPlacement.build(1, 8, 4, 3, num_redundant=0)
    before = Membership(4)
    with pytest.raises(RepairError, match="no tier holds it"):
        plan_repair(p, before, before.after_failure(0), expert_nbytes=1)
    partial = TensorTier({0: (torch.zeros(1, 1, 1),) * 3})  # holds expert 0 only
    lost = p.experts_on_rank(0, 0)
    with pytest.raises(RepairError, match=f"expert {max(lost)} lost every replica"):
        plan_repair(p, before, before.after_failure(0), [partial], expert_nbytes=1)


def test_second_failure_before_the_first_plan_ran_forces_a_replan():
    gen = torch.Generator().manual_seed(5)
    w = random_experts(16, 8, 16, generator=gen)
    moe = ExpertParallelMoE(*w, num_ranks=4, slots_per_rank=8, top_k=2, num_redundant=4)
    from eep.repair import SlotExecutor
    first = moe.membership.after_failure(1)
    stale_plan = plan_repair(moe.placement, moe.membership, first, moe.tiers)
    second = moe.membership.after_failure([1, 2])
    second.epoch = first.epoch + 1  # the coordinator decided again before the first plan ran
    with pytest.raises(RepairError, match="re-plan"):
        stale_plan.execute(SlotExecutor(moe, second, moe.tiers))
    assert moe.membership.epoch == 0
    plan = plan_repair(moe.placement, moe.membership, second, moe.tiers)
    plan.execute(SlotExecutor(moe, second, moe.tiers))
    assert moe.validity().ok and moe.membership.active_ranks() == [0, 3]
    x, logits = torch.randn(16, 16, generator=gen), torch.randn(16, 16, generator=gen)
    torch.testing.assert_close(moe(x, logits), dense_moe(x, *w, router_logits=logits, top_k=2))


def test_bandwidth_measure_and_config():
    bw = Bandwidth.measure(nbytes=8 << 20)
    assert bw.peer_gbps > 0 and bw.h2d_gbps > 0 and bw.disk_gbps > 0 and bw.source.startswith("measured")
    assert Bandwidth.from_config({"peer_gbps": 1, "h2d_gbps": 2, "disk_gbps": 3}).source == "config"
    with pytest.raises(ValueError, match="disk_gbps"):
        Bandwidth(disk_gbps=0)
    with pytest.raises(ValueError, match="unknown"):
        Bandwidth.from_config({"nvlink": 1})


def test_join_transition_is_rejected_by_plan_repair():
    p = ExpertPlacement.build(1, 8, 4, 3)
    m = Membership(4)
    m.fail(1)
    from eep import PlacementError
    with pytest.raises(PlacementError, match="plan_reintegration"):
        plan_repair(p, m, m.after_join(1))
