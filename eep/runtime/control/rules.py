"""The deterministic rules every participant applies to a decision, so no maps are exchanged.

A commit names the ranks that ``failed`` and the ranks that ``joined``; the new epoch's plan is a
pure function of the old placement and membership and of the run's configuration:

1. failures first: ``eep.plan_repair`` (the critical phase only: routing-only drops, then orphan
   restores from the fastest tier that holds each orphan). When the survivors' slots cannot hold
   every orphan it restores what fits and names the rest (``uncovered``): such an epoch is
   committed so that the dead ranks are fenced and their requests re-queued, but it does not
   serve (``CommitPlan.is_valid`` is ``eep.check_validity``);
2. then joins: ``eep.plan_reintegration`` for every joiner at once: its slots take the experts
   with the highest load per live replica (experts with none first, so a rejoin restores coverage
   before it adds redundancy), copied from survivors' replicas, or from a tier for an expert no
   member holds. Survivors keep every slot;
3. a start (every member new: the first epoch, or a restart after every member died): the initial
   placement repaired for the absent ranks (``plan_repair`` from all ranks to the joiners); it
   raises ``InsufficientSlotsError`` when the joiners cannot hold every expert, and the
   coordinator waits for more joiners.

The coordinator computes the plan to publish; every survivor recomputes it and checks it against
the commit; only a joining rank, which has no history, takes it from the (authenticated) commit.
Planning inputs that are not maps come from ``RuntimeConfig`` so that every process agrees: the
tiers every rank opens (``DeclaredTier`` by name: the bytes are in the ranks), the bandwidth model
(``RuntimeConfig.bandwidth``, never a per-process measurement) and the size of one expert.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields

from eep.repair import Bandwidth, Transfer, expert_weight_nbytes, plan_reintegration, plan_repair, plan_rereplication
from eep.repair.plan import predict_transfers
from eep.repair.tiers import DeclaredTier
from eep.runtime.config import RuntimeConfig
from eep.runtime.model import shards_are_fp8
from eep.state import Clause, ExpertPlacement, Membership, check_validity

# phases of a commit's plan, in the order they run (what the timeline reports)
ROUTING_ONLY, ORPHAN_RESTORE, REINTEGRATION, START = "routing-only", "orphan-restore", "reintegration", "start"
REREPLICATION = "re-replication"
_TRANSFER_FIELDS = tuple(f.name for f in fields(Transfer))


@dataclass
class CommitPlan:
    """What one commit changes: the maps of the new epoch and the copies that make them true.

    ``transfers`` are every slot a member must fill before it serves the new epoch (orphan
    restores, joiners' slots), each with its source (tier name, or a peer rank and slot) and its
    predicted seconds; ``phases`` the predicted duration per phase. ``uncovered``
    (``{layer: [expert]}``) lists experts no member holds: the epoch is not EP-valid and must not serve.
    """

    epoch: int
    placement: ExpertPlacement
    transfers: list[Transfer] = field(default_factory=list)
    phases: list[dict] = field(default_factory=list)
    uncovered: dict[int, list[int]] = field(default_factory=dict)
    num_missing_slots: int = 0

    @property
    def is_valid(self) -> bool:
        return not self.uncovered

    def transfers_to(self, rank: int) -> list[Transfer]:
        return [t for t in self.transfers if t.dst_rank == rank]

    def predicted_s_for(self, rank: int) -> float:
        """The predicted time of ``rank``'s copies (they run concurrently: the slowest one)."""
        return max((t.predicted_s for t in self.transfers_to(rank)), default=0.0)

    def describe_uncovered(self, limit: int = 6) -> str:
        """"layer 0: experts [1, 3, ...]; layer 1: ..." and the slots missing, for logs and refusals."""
        layers = [f"layer {layer}: experts {experts}" for layer, experts in sorted(self.uncovered.items())]
        more = f"; ... {len(layers) - limit} more layers" if len(layers) > limit else ""
        return (f"{'; '.join(layers[:limit])}{more} have no replica on a live rank; {self.num_missing_slots} more "
                f"expert slots per layer are needed (a rank has {self.placement.slots_per_rank})")

    def agrees_for(self, rank: int, other: "CommitPlan") -> bool:
        """Whether ``other`` (a published plan) gives the same maps, phases and coverage, and the same
        copies into ``rank``: what a member checks of a commit (each checks the copies it makes)."""
        mine = [[getattr(t, f) for f in _TRANSFER_FIELDS] for t in self.transfers_to(rank)]
        theirs = [[getattr(t, f) for f in _TRANSFER_FIELDS] for t in other.transfers_to(rank)]
        return (self.placement.equal(other.placement) and mine == theirs and self.phases == other.phases
                and self.uncovered == other.uncovered and self.num_missing_slots == other.num_missing_slots)

    def to_wire(self) -> dict:
        """What a commit carries besides the placement: JSON-exact, so survivors compare it as is."""
        return {"transfers": [[getattr(t, f) for f in _TRANSFER_FIELDS] for t in self.transfers],
                "phases": self.phases, "valid": self.is_valid,
                "uncovered": {str(layer): experts for layer, experts in sorted(self.uncovered.items())},
                "missing_slots": self.num_missing_slots}

    @classmethod
    def from_wire(cls, epoch: int, placement: ExpertPlacement, wire: dict) -> "CommitPlan":
        return cls(epoch, placement, [Transfer(*row) for row in wire["transfers"]], list(wire["phases"]),
                   {int(layer): list(experts) for layer, experts in wire["uncovered"].items()},
                   int(wire["missing_slots"]))

    def timeline(self) -> dict:
        """The plan as the timeline records it: phases with predicted seconds, no per-slot detail."""
        return {"phases": self.phases, "valid": self.is_valid, "num_transfers": len(self.transfers),
                "uncovered": {str(k): v for k, v in self.uncovered.items()}, "missing_slots": self.num_missing_slots}


class RepairRules:
    """The planning inputs of one run and the rules above; the same in the coordinator and every rank."""

    def __init__(self, cfg: RuntimeConfig):
        self.cfg = cfg
        m = cfg.model
        self.initial = ExpertPlacement.build(m.num_layers, m.num_experts, cfg.num_ranks, cfg.slots_per_rank,
                                             num_redundant=cfg.num_redundant)
        self.tiers = [DeclaredTier(name) for name in tier_names(cfg)]
        self.bandwidth = runtime_bandwidth(cfg)
        self.expert_nbytes = runtime_expert_nbytes(cfg)

    def plan_commit(self, old: ExpertPlacement, old_active: list[bool], failed: Iterable[int],
                    joined: Iterable[int], epoch: int, *, rereplicate: bool = False) -> CommitPlan:
        """The plan of a commit with continuing members (``old_active`` minus ``failed`` is not empty).

        ``rereplicate`` (nothing failed or joined): the commit that switches to the re-replicated maps."""
        failed = sorted({r for r in failed if old_active[r]})  # a rank already out fails nothing more
        joined = sorted(set(joined))
        if rereplicate and not failed and not joined:
            return self.rereplication(old, old_active, epoch)
        membership = Membership(len(old_active), active=old_active, epoch=epoch - 1)
        placement, transfers, phases = old, [], []
        uncovered, missing = {}, 0
        if failed:
            after = membership.after_failure(failed)
            repair = plan_repair(old, membership, after, self.tiers, self.bandwidth, expert_nbytes=self.expert_nbytes,
                                 rereplicate=False, allow_uncovered=True)
            placement, membership = repair.placement, after
            transfers += repair.restores
            phases.append(_phase(ROUTING_ONLY, [], 0.0, dropped_slots=repair.num_dropped_slots))
            if repair.restores:
                phases.append(_phase(ORPHAN_RESTORE, repair.restores, repair.predicted_pause_s))
        if joined:
            rejoin = plan_reintegration(placement, membership, joined, tiers=self.tiers, bandwidth=self.bandwidth,
                                        expert_nbytes=self.expert_nbytes)
            placement = rejoin.placement
            for r in joined:
                membership = membership.after_join(r)
            transfers += rejoin.transfers
            phases.append(_phase(REINTEGRATION, rejoin.transfers, rejoin.predicted_s))
        uncovered, missing = _uncovered(membership, placement)
        return CommitPlan(epoch, placement, transfers, phases, uncovered, missing)

    def plan_start(self, active: list[bool], epoch: int) -> CommitPlan:
        """Every member new: the initial placement repaired for the absent ranks.

        Raises ``InsufficientSlotsError`` when the members cannot hold every expert."""
        everyone = Membership(len(active), epoch=epoch - 1)
        if all(active):
            return CommitPlan(epoch, self.initial.clone(), phases=[_phase(START, [], 0.0)])
        after = everyone.after_failure([r for r, a in enumerate(active) if not a])
        repair = plan_repair(self.initial, everyone, after, self.tiers, self.bandwidth,
                             expert_nbytes=self.expert_nbytes, rereplicate=False)
        return CommitPlan(epoch, repair.placement, repair.restores,
                          [_phase(START, repair.restores, repair.predicted_pause_s)])

    def rereplication(self, placement: ExpertPlacement, active: list[bool], epoch: int) -> CommitPlan:
        """Spare slots of the members of ``active`` filled with replicas copied from live peers
        (``eep.plan_rereplication``); the maps of the commit that switches to them (``epoch``)."""
        rep = plan_rereplication(placement, Membership(len(active), active=active, epoch=epoch - 1),
                                 bandwidth=self.bandwidth, expert_nbytes=self.expert_nbytes)
        return CommitPlan(epoch, rep.placement, rep.transfers,
                          [_phase(REREPLICATION, rep.transfers, rep.predicted_s)])

    def preload(self, latest: tuple[int, ExpertPlacement, list[bool]] | None, rank: int) -> CommitPlan:
        """What ``rank`` copies into its slots before it asks to join, as a plan (its epoch: the commit
        it was made from; -1 at the start).

        The coordinator will plan the join with ``plan_reintegration`` from the latest committed
        maps (``latest``: epoch, placement, active); a joiner that runs that plan's copies beforehand
        (from peers first, as the plan orders them) has nothing left to copy when the commit comes,
        unless the membership changed in between (then it copies the difference). Without a commit
        that leaves it out (the start, or its failure not yet committed) it loads its initial row
        from the fastest tier."""
        if latest is None or latest[2][rank]:
            s = self.initial.slots_per_rank
            transfers = []
            for layer, row in enumerate(self.initial.phys_to_logical[:, rank * s:(rank + 1) * s].tolist()):
                for local, expert in enumerate(row):
                    tier = next((t for t in self.tiers if t.has_expert(layer, expert)), None)
                    if expert >= 0 and tier is not None:
                        transfers.append(Transfer(layer, layer, expert, tier.name, None, None, rank, rank * s + local,
                                                  self.expert_nbytes))
            transfers, predicted_s = predict_transfers(transfers, self.bandwidth)
            return CommitPlan(-1 if latest is None else latest[0], self.initial.clone(), transfers,
                              [_phase(START, transfers, predicted_s)])
        epoch, placement, active = latest
        rejoin = plan_reintegration(placement, Membership(len(active), active=active, epoch=epoch), rank,
                                    tiers=self.tiers, bandwidth=self.bandwidth, expert_nbytes=self.expert_nbytes)
        return CommitPlan(epoch, rejoin.placement, rejoin.transfers,
                          [_phase(REINTEGRATION, rejoin.transfers, rejoin.predicted_s)])


def tier_names(cfg: RuntimeConfig) -> list[str]:
    """The tiers every rank restores from, fastest first (what its engine opens)."""
    if cfg.engine == "shm":
        return ["host"] if cfg.shard_dir is None else ["host", "disk"]
    return list(cfg.engine_options.get("tiers", ["host", "disk"]))


def runtime_expert_nbytes(cfg: RuntimeConfig) -> int:
    """Bytes of one expert as the run's slots hold it, what every transfer is planned with: float32
    in the shm engine, bf16 in GpuEngine, or block-scaled FP8 when the shards hold FP8 experts (e4m3
    weights plus their float32 128x128 scales, which every copy moves together)."""
    m = cfg.model
    if cfg.engine == "shm":
        return expert_weight_nbytes(m.hidden, m.intermediate, dtype_bytes=4)
    return expert_weight_nbytes(m.hidden, m.intermediate, fp8=shards_are_fp8(cfg.shard_dir))


def runtime_bandwidth(cfg: RuntimeConfig) -> Bandwidth:
    """The link model every process plans with: ``cfg.bandwidth``, else the defaults (one shared
    memory system for the CPU engines)."""
    if cfg.bandwidth is not None:
        return Bandwidth.from_config(cfg.bandwidth)
    return Bandwidth(is_shared_host=cfg.engine in ("shm", "cpu_elastic", "gloo"))


def _phase(name: str, transfers: list[Transfer], predicted_s: float, **extra) -> dict:
    return {"phase": name, "predicted_s": predicted_s, "transfers": len(transfers),
            "nbytes": sum(t.nbytes for t in transfers), **extra}


def _uncovered(membership: Membership, placement: ExpertPlacement) -> tuple[dict[int, list[int]], int]:
    """Experts with no replica on an active rank, per layer (``check_validity``'s coverage clause),
    and the most any layer lacks."""
    report = check_validity(membership, placement)
    uncovered: dict[int, list[int]] = {}
    for problem in report.by_clause(Clause.COVERAGE):
        uncovered.setdefault(problem.layer, []).append(problem.expert)
    return uncovered, max((len(v) for v in uncovered.values()), default=0)

