"""EP validity: the predicate that must hold before a step runs.

Clauses (``Clause``):
  COVERAGE      every logical expert of every layer has a replica on an active rank whose
                weights are current;
  ROUTING       the routing tables name only slots on active ranks, and agree with each other;
  REACHABILITY  every pair of active ranks can reach each other.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from eep.state.membership import Membership
from eep.state.placement import NO_EXPERT, ExpertPlacement


class Clause(enum.Enum):
    COVERAGE = "coverage"
    ROUTING = "routing"
    REACHABILITY = "reachability"


@dataclass(frozen=True)
class Problem:
    clause: Clause
    message: str
    layer: int | None = None
    expert: int | None = None
    rank: int | None = None

    def __str__(self) -> str:
        where = ", ".join(f"{k} {v}" for k, v in (("layer", self.layer), ("expert", self.expert),
                                                    ("rank", self.rank)) if v is not None)
        return f"[{self.clause.value}] {where + ': ' if where else ''}{self.message}"


@dataclass
class ValidityReport:
    epoch: int
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def by_clause(self, clause: Clause) -> list[Problem]:
        return [p for p in self.problems if p.clause is clause]

    def summary(self, limit: int = 5) -> str:
        if self.ok:
            return f"epoch {self.epoch}: EP valid"
        lines = [f"epoch {self.epoch}: EP INVALID, {len(self.problems)} problem(s)"]
        lines += [f"  {p}" for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"  ... and {len(self.problems) - limit} more")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def check_validity(membership: Membership, placement: ExpertPlacement, *,
                   weights_current: torch.Tensor | None = None,
                   reachable: torch.Tensor | None = None) -> ValidityReport:
    """Check every clause and report each failure with its layer, expert and rank.

    Parameters:
        weights_current: ``[num_layers, num_phys_slots]`` bool, whether each slot holds the
            weights its map entry claims; ``None`` means all current.
        reachable: ``[num_ranks, num_ranks]`` bool, ``reachable[a, b]`` when rank ``a`` can
            reach rank ``b``; ``None`` means all pairs reachable.
    """
    report = ValidityReport(membership.epoch)
    if membership.num_ranks != placement.num_ranks:
        report.problems.append(Problem(Clause.ROUTING, f"membership has {membership.num_ranks} rank slots but "
                                       f"the placement has {placement.num_ranks}"))
        return report
    active = membership.active_cpu.tolist()
    slots = placement.slots_per_rank
    p2l = placement.phys_to_logical.cpu()
    l2p = placement.logical_to_phys.cpu()
    counts = placement.replica_count.cpu()
    current = None if weights_current is None else weights_current.cpu().bool()
    if current is not None and tuple(current.shape) != tuple(p2l.shape):
        raise ValueError(f"weights_current has shape {tuple(current.shape)}, expected {tuple(p2l.shape)}")

    # Vectorised over every (layer, expert) first; only the pairs with a problem are described one
    # by one (in layer, expert order), so a valid placement costs a few tensor ops, not a Python
    # loop over every expert of every layer (this check runs before every epoch serves).
    num_layers, num_experts = counts.shape
    width = max(1, min(int(counts.max()) if counts.numel() else 1, l2p.shape[2]))  # columns in use
    slot_active = torch.tensor(active, dtype=torch.bool).repeat_interleave(slots)
    listed = torch.arange(width) < counts.unsqueeze(-1)  # [L, E, width]: entries within replica_count
    beyond = (l2p[:, :, width:] != NO_EXPERT).any(-1)  # padding columns that name a slot
    l2p = l2p[:, :, :width]
    index = l2p.clamp(min=0)
    on_active = listed & (l2p >= 0) & slot_active[index]
    held = p2l.gather(1, index.view(num_layers, -1)).view(num_layers, num_experts, width)
    serving = on_active if current is None else \
        on_active & current.gather(1, index.view(num_layers, -1)).view(num_layers, num_experts, width)
    expert_ids = torch.arange(num_experts).view(1, -1, 1)
    bad = (~serving.any(-1) | (listed & ((l2p < 0) | ~slot_active[index])).any(-1)
           | (on_active & (held != expert_ids)).any(-1)
           | (~listed & (l2p != NO_EXPERT)).any(-1) | beyond)
    l2p = placement.logical_to_phys.cpu()
    for layer, expert in bad.nonzero().tolist():
        n = int(counts[layer, expert])
        replicas = l2p[layer, expert, :n].tolist()
        serving_now = [p for p in replicas
                       if p >= 0 and active[p // slots] and (current is None or bool(current[layer, p]))]
        if not serving_now:
            live_stale = [p for p in replicas if p >= 0 and active[p // slots]]
            why = (f"replicas in slots {live_stale} hold stale weights" if live_stale
                   else "no replica on an active rank" + (f" (lost slots {replicas})" if replicas else ""))
            report.problems.append(Problem(Clause.COVERAGE, why, layer=layer, expert=expert))
        for k, p in enumerate(replicas):
            if p < 0:
                report.problems.append(Problem(Clause.ROUTING, f"replica_count is {n} but logical_to_phys entry {k} "
                                               "names no slot", layer=layer, expert=expert))
            elif not active[p // slots]:
                report.problems.append(Problem(Clause.ROUTING, f"routing table names slot {p} on inactive rank",
                                               layer=layer, expert=expert, rank=p // slots))
            elif int(p2l[layer, p]) != expert:
                report.problems.append(Problem(Clause.ROUTING, f"logical_to_phys names slot {p}, which holds "
                                               f"expert {int(p2l[layer, p])}", layer=layer, expert=expert))
        if bool((l2p[layer, expert, n:] != NO_EXPERT).any()):
            report.problems.append(Problem(Clause.ROUTING, "entries past replica_count are not NO_EXPERT",
                                           layer=layer, expert=expert))

    if reachable is not None:
        reach = reachable.cpu().bool()
        for a in range(membership.num_ranks):
            for b in range(membership.num_ranks):
                if a != b and active[a] and active[b] and not bool(reach[a, b]):
                    report.problems.append(Problem(Clause.REACHABILITY, f"cannot reach rank {b}", rank=a))
    return report
