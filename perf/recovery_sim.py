"""Recovery simulator: the real planner over a simulated cluster of N nodes x 8 GPUs.

    python perf/recovery_sim.py [--json OUT.json] [--png OUT.png] [--quick]
    python perf/recovery_sim.py --calibrate perf/failure_bench_4xH100/results-run1.json

Nothing here models the planner: it builds real placements (`ExpertPlacement.build`), applies
real failures, and asks the real `plan_repair` / `plan_reintegration` for the transfers and
their contention-aware predicted time over a `Bandwidth` with a node topology (NVLink inside a
node, one NIC per GPU between nodes, PCIe host->device per GPU, one disk per node). Only the
phases the planner does not own are parameters: the detection timeout, the agreement round
(one authenticated store write + the survivors' poll) and the table switch (one host->device
write of each layer's routing tables).

Host tier: each node pins a host copy of every expert (the fastest restore that survives a GPU
loss; the routed experts' bytes per node). With ``--no-host`` only the disk serves.

Expert format (``--dtype``): ``native`` (default: block-scaled FP8 for deepseek-v3, as its checkpoint
ships, bf16 otherwise), ``bf16`` or ``fp8`` for every shape. FP8 counts the weights and their
float32 128x128 block scales (``eep.repair.expert_weight_nbytes``), which a restore moves together.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from functools import lru_cache

from eep import ExpertPlacement, InsufficientSlotsError, Membership, plan_reintegration, plan_repair
from eep.repair import Bandwidth, expert_weight_nbytes

# name: (hidden, moe_intermediate, num_experts, top_k, num_layers), as in DESIGN.md
SHAPES = {
    "qwen3-30b-a3b": (2048, 768, 128, 8, 48),
    "deepseek-v3": (7168, 2048, 256, 8, 58),
    "tiny": (64, 32, 16, 4, 2),
}


class _VirtualTier:
    """A tier that holds every expert and moves no bytes: the simulator only asks what and how big."""

    def __init__(self, name: str, expert_nbytes: int):
        self.name = name
        self._nbytes = expert_nbytes

    def has_expert(self, layer: int, expert: int) -> bool:
        return True

    def expert_nbytes(self, layer: int, expert: int) -> int:
        return self._nbytes

    def copy_expert_into(self, *args, **kwargs) -> int:
        raise RuntimeError("the simulator never copies")


@dataclass
class SimConfig:
    shape: str = "deepseek-v3"
    ep: int = 32
    failed: str = "1"  # a number of ranks (spread over nodes: rank 0, 8, 16, ...) or "node" (all of node 0)
    redundancy: float = 0.125  # slots_per_rank = ceil(E * (1 + redundancy) / ep), spare slots hold replicas
    gpus_per_node: int = 8
    dtype: str = "native"  # "bf16", "fp8" (weights + block scales) or the model's native format (fp8 for deepseek-v3)
    detection_s: float = 1.0  # heartbeat timeout; the runtime's default
    agreement_s: float = 0.01  # one decision write + the survivors' poll interval
    use_host_tier: bool = True
    node_aware: bool = True  # replicas of an expert on different nodes first
    bandwidth: dict = field(default_factory=dict)  # overrides of Bandwidth fields


def is_fp8(config: SimConfig) -> bool:
    if config.dtype not in ("native", "bf16", "fp8"):
        raise ValueError(f"SimConfig.dtype={config.dtype!r}, expected 'native', 'bf16' or 'fp8'")
    return config.dtype == "fp8" or (config.dtype == "native" and config.shape.startswith("deepseek-v3"))


def failed_ranks(config: SimConfig) -> list[int]:
    if config.failed == "node":
        return list(range(min(config.gpus_per_node, config.ep)))
    n = int(config.failed)
    # Spread single-GPU faults over nodes: independent faults rarely share a node.
    stride = config.gpus_per_node if n * config.gpus_per_node <= config.ep else max(1, config.ep // n)
    return [i * stride for i in range(n)]


@lru_cache(maxsize=64)
def _placement(shape: str, ep: int, redundancy: float, ranks_per_node: int) -> ExpertPlacement:
    _, _, num_experts, _, num_layers = SHAPES[shape]
    slots = math.ceil(num_experts * (1 + redundancy) / ep)
    return ExpertPlacement.build(num_layers, num_experts, ep, slots, ranks_per_node=ranks_per_node)


def simulate(config: SimConfig) -> dict:
    hidden, inter, num_experts, _, num_layers = SHAPES[config.shape]
    expert_nbytes = expert_weight_nbytes(hidden, inter, fp8=is_fp8(config))
    bandwidth = Bandwidth(**{"ranks_per_node": config.gpus_per_node, "source": "simulated", **config.bandwidth})
    placement = _placement(config.shape, config.ep, config.redundancy,
                           config.gpus_per_node if config.node_aware else 0)
    failed = failed_ranks(config)
    before = Membership(config.ep)
    row = {"config": asdict(config), "failed_ranks": failed, "slots_per_rank": placement.slots_per_rank,
           "num_phys_slots": placement.num_phys_slots}
    if len(failed) >= config.ep:
        return {**row, "feasible": False, "reason": "every rank failed"}
    after = before.after_failure(failed)
    tiers = [_VirtualTier("host", expert_nbytes)] if config.use_host_tier else []
    tiers.append(_VirtualTier("disk", expert_nbytes))
    try:
        plan = plan_repair(placement, before, after, tiers, bandwidth, expert_nbytes=expert_nbytes)
    except InsufficientSlotsError as exc:
        return {**row, "feasible": False, "reason": str(exc)}
    # The switch writes each layer's logical_to_phys and phys_to_logical (int32 on device) once.
    table_nbytes = num_layers * (num_experts * config.ep + placement.num_phys_slots) * 4
    switch_s = table_nbytes / (bandwidth.h2d_gbps * 1e9) + num_layers * 5e-6
    rejoin = plan_reintegration(plan.placement, after, failed[0], bandwidth=bandwidth, expert_nbytes=expert_nbytes)
    by_tier = {}
    for t in plan.restores:
        by_tier[t.source_tier] = by_tier.get(t.source_tier, 0) + t.nbytes
    phases = {"detection_s": config.detection_s, "agreement_s": config.agreement_s,
              "transfers_s": plan.predicted_pause_s, "table_switch_s": switch_s}
    return {**row, "feasible": True,
            "experts_lost_all_replicas": len(plan.restores),
            "experts_lost_all_replicas_per_layer": len(plan.restores) / num_layers,
            "routing_only": plan.is_routing_only,
            "restore_bytes_by_tier": by_tier,
            "phases": phases,
            "recovery_pause_s": sum(phases.values()),
            "rereplication_background_s": plan.predicted_background_s,
            "reintegration_transfer_s": rejoin.predicted_s,
            "reintegration_bytes": sum(t.nbytes for t in rejoin.transfers),
            "reintegration_pause_s": config.agreement_s + switch_s}


def sweep(shapes=("deepseek-v3", "qwen3-30b-a3b"), eps=(8, 16, 32, 64, 128, 256),
          failures=("1", "2", "4", "8", "16", "node"), redundancies=(0.125, 0.5), **overrides) -> list[dict]:
    rows = []
    for shape in shapes:
        for ep in eps:
            for redundancy in redundancies:
                for failed in failures:
                    if failed != "node" and int(failed) >= ep // 2:
                        continue
                    if failed == "node" and ep <= 8:
                        continue
                    rows.append(simulate(SimConfig(shape=shape, ep=ep, failed=failed, redundancy=redundancy,
                                                   **overrides)))
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| shape | EP | redundancy | slots/rank | failed | orphans/layer | restore GB (tier) | transfers s | "
             "recovery pause s | rejoin transfers s | rejoin pause s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        c = r["config"]
        if not r["feasible"]:
            lines.append(f"| {c['shape']} | {c['ep']} | {c['redundancy']} | {r['slots_per_rank']} | {c['failed']} | "
                         f"not repairable: survivors have too few slots | | | | | |")
            continue
        tiers = ", ".join(f"{v / 1e9:.2f} {k}" for k, v in r["restore_bytes_by_tier"].items()) or "0"
        lines.append(f"| {c['shape']} | {c['ep']} | {c['redundancy']} | {r['slots_per_rank']} | {c['failed']} | "
                     f"{r['experts_lost_all_replicas_per_layer']:.2f} | {tiers} | {r['phases']['transfers_s']:.3f} | "
                     f"{r['recovery_pause_s']:.3f} | {r['reintegration_transfer_s']:.3f} | "
                     f"{r['reintegration_pause_s']:.4f} |")
    return "\n".join(lines)


def calibration_rows(results: dict) -> list[dict]:
    """The simulator's row for the failure benchmark's configuration (``perf/failure_bench.py``
    results.json: shape, EP, slots, one failed rank, its measured detection) and the observed row,
    in ``format_table``'s form, plus both pauses by phase (``"phases"``) for a side-by-side read."""
    cfg, f = results["config"], results["failure"]
    model, ep = cfg["model"], cfg["num_ranks"]
    shape = next(name for name, (h, i, e, _, n) in SHAPES.items()
                 if (h, i, e) == (model["hidden"], model["intermediate"], model["num_experts"]))
    repair = next(b for b in f["breakdown"] if b["kind"] == "repair" and b.get("failed"))
    rejoin = next((b for b in f["breakdown"] if b["kind"] == "rejoin"), {})
    layers = model["num_layers"]
    sim_shape = shape if SHAPES[shape][4] == layers else f"{shape}@{layers}"
    if sim_shape not in SHAPES:
        SHAPES[sim_shape] = SHAPES[shape][:4] + (layers,)
    predicted = simulate(SimConfig(shape=sim_shape, ep=ep, failed="1", gpus_per_node=ep,
                                   redundancy=cfg["slots_per_rank"] * ep / model["num_experts"] - 1,
                                   detection_s=repair.get("detection_s") or 1.0))
    by_tier = {t: v["nbytes"] for t, v in (repair.get("repair_by_tier") or {}).items()}
    experts = sum(v["experts"] for v in (repair.get("repair_by_tier") or {}).values())
    observed_phases = {"detection_s": repair.get("detection_s"),
                       "agreement_s": repair["fault_to_commit_s"] - (repair.get("detection_s") or 0.0),
                       "transfers_s": repair["repair_transfers_s"],
                       "table_switch_s": (repair.get("table_switch_s") or 0.0) + (repair.get("warmup_s") or 0.0)}
    observed = {"config": {**predicted["config"], "shape": f"{sim_shape} observed ({results.get('device')})"},
                "slots_per_rank": cfg["slots_per_rank"], "feasible": True,
                "experts_lost_all_replicas_per_layer": experts / layers, "restore_bytes_by_tier": by_tier,
                "phases": observed_phases, "recovery_pause_s": f["recovery_pause_s"],
                "reintegration_transfer_s": rejoin.get("joiner_load_s") or 0.0,
                "reintegration_pause_s": f["reintegration_pause_s"]}
    return [predicted, observed]


def plot(rows: list[dict], path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FixedLocator, NullLocator
    except ImportError:
        print('matplotlib is not installed: no plot (pip install "eep[plot]")', file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    labels = {"1": "1 rank failed", "4": "4 ranks failed", "16": "16 ranks failed", "node": "a node (8 ranks) lost"}
    for ax, shape in zip(axes, ("deepseek-v3", "qwen3-30b-a3b")):
        eps = set()
        for failed in ("1", "4", "16", "node"):
            pts = [(r["config"]["ep"], r["recovery_pause_s"]) for r in rows
                   if r["feasible"] and r["config"]["shape"] == shape and r["config"]["failed"] == failed
                   and r["config"]["redundancy"] == 0.5]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=labels[failed])
                eps.update(ep for ep, _ in pts)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(sorted(eps)))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(ep) for ep in sorted(eps)])
        ax.set_title(f"{shape}: 1.5 slots per expert, host tier", fontsize=10)
        ax.set_xlabel("EP size (ranks, 8 per node)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("predicted recovery pause (s)\nincluding 1 s of failure detection")
    axes[0].legend(title="failure", fontsize=9)
    fig.suptitle("Recovery simulator: the repair planner over simulated clusters (perf/recovery_sim.py)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json")
    parser.add_argument("--png")
    parser.add_argument("--quick", action="store_true", help="EP 8-32 only")
    parser.add_argument("--no-host", action="store_true", help="restore from disk only")
    parser.add_argument("--dtype", choices=("native", "bf16", "fp8"), default="native",
                        help="expert format: native (FP8 for deepseek-v3, bf16 otherwise), bf16, or block-scaled fp8 "
                             "(weights + scales) for every shape")
    parser.add_argument("--calibrate", metavar="RESULTS_JSON",
                        help="only the simulator's row for a failure-benchmark run next to the observed one")
    args = parser.parse_args()
    if args.calibrate:
        with open(args.calibrate) as f:
            rows = calibration_rows(json.load(f))
        print(format_table(rows))
        for r in rows:
            print(f"{r['config']['shape']}: " + ", ".join(f"{k} {v:.3f}" for k, v in r["phases"].items()))
        return
    eps = (8, 16, 32) if args.quick else (8, 16, 32, 64, 128, 256)
    rows = sweep(eps=eps, use_host_tier=not args.no_host, dtype=args.dtype)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.png:
        plot(rows, args.png)


if __name__ == "__main__":
    main()
