"""Repair planning time and predicted-vs-observed restore time.

    python perf/bench_repair_plan.py [--json OUT.json]

1. Planning time: `plan_repair` (critical phase + re-replication) and `plan_reintegration` for
   deepseek-v3's 256 experts x 58 layers over 32 ranks (target: under 10 ms for the critical
   phase), and what the runtime computes per commit (`RepairRules.plan_commit`: the plan plus the
   `check_validity` of the new epoch; each survivor recomputes it while the coordinator collects
   acks). One torch thread, as a rank process runs; median and best wall time and the median CPU
   time of the process (on a shared machine the wall time includes other jobs' turns).
2. Predicted vs observed: one qwen3-30b-a3b MoE layer (128 experts, hidden 2048, intermediate 768,
   bf16) on 4 simulated ranks; a rank fails, orphans are restored from the host tier by the
   reference executor; the planner's prediction uses a `Bandwidth.measure()` of this machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from eep import ExpertPlacement, Membership, check_validity
from eep.reference import ExpertParallelMoE
from eep.repair import Bandwidth, TensorTier, plan_reintegration, plan_repair
from eep.runtime import RuntimeConfig, TinyConfig
from eep.runtime.control.rules import RepairRules


def _timed_ms(fn, repeats: int = 15) -> dict:
    """``{"ms": median wall, "best_ms": best wall, "cpu_ms": median process CPU}`` over ``repeats`` runs."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append((time.perf_counter() - start) * 1e3)
        cpu.append((time.process_time() - start_cpu) * 1e3)
    return {"ms": statistics.median(wall), "best_ms": min(wall), "cpu_ms": statistics.median(cpu)}


def planning_times(num_layers: int = 58, num_experts: int = 256, num_ranks: int = 32) -> dict:
    gen = torch.Generator().manual_seed(0)
    load = torch.rand(num_layers, num_experts, generator=gen) * 1000
    nbytes = 3 * 7168 * 2048 * 2
    w = torch.zeros(num_experts, 1, 1)
    tiers = [TensorTier({layer: (w, w, w) for layer in range(num_layers)})]
    out = {}
    for slots, redundant, label in [(9, None, "9 slots/rank, 32 redundant, no spare"),
                                    (10, 32, "10 slots/rank, 32 redundant, 32 spare")]:
        p = ExpertPlacement.build(num_layers, num_experts, num_ranks, slots, load, num_redundant=redundant)
        before = Membership(num_ranks)
        after = before.after_failure(5)
        crit = _timed_ms(lambda: plan_repair(p, before, after, tiers, expert_nbytes=nbytes, rereplicate=False))
        full = _timed_ms(lambda: plan_repair(p, before, after, tiers, expert_nbytes=nbytes, load=load))
        repaired = plan_repair(p, before, after, tiers, expert_nbytes=nbytes, rereplicate=False).placement
        rejoin = _timed_ms(lambda: plan_reintegration(repaired, after, 5, load, expert_nbytes=nbytes), repeats=5)
        valid = _timed_ms(lambda: check_validity(after, repaired))
        out[label] = {"plan_repair_critical": crit, "plan_repair_with_rereplication": full,
                      "plan_reintegration": rejoin, "check_validity": valid}
    # the runtime's commit plans (uniform load, as the runtime plans today)
    model = TinyConfig(hidden=7168, intermediate=2048, num_experts=num_experts, top_k=8, num_layers=num_layers)
    rules = RepairRules(RuntimeConfig(num_ranks=num_ranks, slots_per_rank=10, num_redundant=32, model=model,
                                      engine="fused"))
    everyone = [True] * num_ranks
    failed = rules.plan_commit(rules.initial, everyone, [5], [], 1)
    after = [r != 5 for r in range(num_ranks)]
    out["runtime commit, 10 slots/rank, 32 redundant, 32 spare"] = {
        "plan_commit_failure": _timed_ms(lambda: rules.plan_commit(rules.initial, everyone, [5], [], 1)),
        "plan_commit_join": _timed_ms(lambda: rules.plan_commit(failed.placement, after, [], [5], 2), repeats=5)}
    return out


def predicted_vs_observed() -> dict:
    gen = torch.Generator().manual_seed(1)
    num_experts, hidden, inter = 128, 2048, 768
    w = [(torch.randn(num_experts, *shape, generator=gen) / 30).bfloat16()
         for shape in ((inter, hidden), (inter, hidden), (hidden, inter))]
    bandwidth = Bandwidth.measure(nbytes=256 << 20)
    tier = TensorTier({0: tuple(w)})
    moe = ExpertParallelMoE(*w, num_ranks=4, slots_per_rank=44, top_k=8, num_redundant=0, tiers=[tier],
                            bandwidth=bandwidth)
    plan = moe.fail(2)
    observed = moe.last_report
    return {"bandwidth": bandwidth.to_dict(), "num_restores": len(plan.restores),
            "restore_bytes": plan.restore_nbytes, "predicted_pause_s": plan.predicted_pause_s,
            "observed_pause_s": observed.total_s, "observed_over_predicted": observed.total_s / plan.predicted_pause_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {"planning": planning_times(), "restore": predicted_vs_observed()}
    for label, row in result["planning"].items():
        print(f"deepseek-v3 x 32 ranks, {label}: " + ", ".join(
            f"{k} {v['ms']:.2f} ms (best {v['best_ms']:.2f}, cpu {v['cpu_ms']:.2f})" for k, v in row.items()))
    r = result["restore"]
    print(f"qwen3-30b-a3b layer, 4 ranks, rank 2 fails: {r['num_restores']} experts from host, "
          f"{r['restore_bytes'] / 1e6:.0f} MB, predicted {r['predicted_pause_s'] * 1e3:.1f} ms, "
          f"observed {r['observed_pause_s'] * 1e3:.1f} ms (x{r['observed_over_predicted']:.2f}); "
          f"bandwidth {r['bandwidth']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
