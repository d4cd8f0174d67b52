"""Repair planning time and predicted-vs-observed restore time.

    python perf/bench_repair_plan.py [--json OUT.json]

1. Planning time: `plan_repair` (critical phase + re-replication) and `plan_reintegration` for
   deepseek-v3's 256 experts x 58 layers over 32 ranks (target: under 10 ms for plan_repair).
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

from eep import ExpertPlacement, Membership
from eep.reference import ExpertParallelMoE
from eep.repair import Bandwidth, TensorTier, plan_reintegration, plan_repair


def _median_ms(fn, repeats: int = 15) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


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
        crit = _median_ms(lambda: plan_repair(p, before, after, tiers, expert_nbytes=nbytes, rereplicate=False))
        full = _median_ms(lambda: plan_repair(p, before, after, tiers, expert_nbytes=nbytes, load=load))
        repaired = plan_repair(p, before, after, tiers, expert_nbytes=nbytes, rereplicate=False).placement
        rejoin = _median_ms(lambda: plan_reintegration(repaired, after, 5, load, expert_nbytes=nbytes), repeats=5)
        out[label] = {"plan_repair_critical_ms": crit, "plan_repair_with_rereplication_ms": full,
                      "plan_reintegration_ms": rejoin}
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
    result = {"planning": planning_times(), "restore": predicted_vs_observed()}
    for label, row in result["planning"].items():
        print(f"deepseek-v3 x 32 ranks, {label}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()))
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
