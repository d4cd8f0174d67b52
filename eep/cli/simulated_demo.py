"""Part 1 of ``eep demo``: a simulated EP MoE layer on the CPU loses a rank and keeps its outputs.

Shape ``tiny`` (hidden 64, intermediate 32, 16 experts, top-4), random weights, slots per rank and
redundant replicas as the runtime chooses them (``eep.state.placement.default_slots_per_rank``):
at 4 ranks, 8 slots each = 16 primaries + 8 redundant replicas + 8 spare slots.
"""

from __future__ import annotations

import torch

from eep.reference import ExpertParallelMoE, dense_moe
from eep.state.placement import default_num_redundant, default_slots_per_rank


def run_demo(*, num_ranks: int = 4, failed_rank: int = 1, seed: int = 0, num_tokens: int = 64) -> bool:
    """Run the demo and print what happens; returns True when every check passed."""
    gen = torch.Generator().manual_seed(seed)
    num_experts, inter, hidden, top_k = 16, 32, 64, 4
    w_gate = torch.randn(num_experts, inter, hidden, generator=gen) / hidden ** 0.5
    w_up = torch.randn(num_experts, inter, hidden, generator=gen) / hidden ** 0.5
    w_down = torch.randn(num_experts, hidden, inter, generator=gen) / inter ** 0.5
    x = torch.randn(num_tokens, hidden, generator=gen)
    logits = torch.randn(num_tokens, num_experts, generator=gen)

    slots = default_slots_per_rank(num_experts, num_ranks)
    moe = ExpertParallelMoE(w_gate, w_up, w_down, num_ranks=num_ranks, slots_per_rank=slots, top_k=top_k,
                            num_redundant=default_num_redundant(num_experts, num_ranks, slots))
    oracle = dense_moe(x, w_gate, w_up, w_down, router_logits=logits, top_k=top_k)
    print(f"eep demo: {num_ranks} simulated EP ranks, {num_experts} experts, top-{top_k}, "
          f"{moe.placement.num_phys_slots} physical slots")
    _print_placement(moe)
    ok = _check("before failure", moe(x, logits), oracle, moe)

    print(f"\n*** rank {failed_rank} fails ***")
    stale = moe.membership.after_failure(failed_rank)
    from eep.state import check_validity
    print("validity with the old routing tables:")
    print("  " + check_validity(stale, moe.placement).summary(limit=3).replace("\n", "\n  "))
    repair = moe.fail(failed_rank)
    print(f"repair plan: {repair.num_dropped_slots} slots lost, steps {[s.value for s in repair.steps]}, "
          f"{len(repair.restores)} orphaned experts restored, predicted pause {repair.predicted_pause_s * 1e6:.1f} us:")
    for t in repair.restores:
        print(f"  expert {t.logical_expert_id:2d} -> rank {t.dst_rank} slot {t.dst_slot} "
              f"(from the {t.source_tier} tier, {t.nbytes} bytes)")
    _print_placement(moe)
    ok &= _check("after failure + repair", moe(x, logits), oracle, moe)

    print(f"\n*** rank {failed_rank} rejoins ***")
    moe.join(failed_rank)
    _print_placement(moe)
    ok &= _check("after rejoin", moe(x, logits), oracle, moe)
    print("\nRESULT:", "outputs unchanged across failure, repair and rejoin" if ok else "MISMATCH")
    return ok


def _check(label: str, out: torch.Tensor, oracle: torch.Tensor, moe: ExpertParallelMoE) -> bool:
    err = (out - oracle).norm() / oracle.norm()
    report = moe.validity()
    ok = bool(err < 1e-5) and report.ok
    print(f"[{label}] {report.summary()} | rel. error vs dense oracle {err:.2e} -> {'OK' if ok else 'FAIL'}")
    return ok


def _print_placement(moe: ExpertParallelMoE) -> None:
    s = moe.slots_per_rank
    row = moe.placement.phys_to_logical[0].tolist()
    for rank in range(moe.num_ranks):
        state = "active" if moe.membership.is_active(rank) else "DEAD  "
        cells = " ".join("  ." if e < 0 else f"{e:3d}" for e in row[rank * s:(rank + 1) * s])
        print(f"  rank {rank} [{state}] slots: {cells}")

