"""Repair plans: turn a membership change into a valid instance again, fastest first.

A failure plan has up to three kinds of step (``StepKind``):

- ROUTING_ONLY   lost slots whose expert keeps a live replica are dropped from the routing
                 tables; no bytes move. If that covers everything, the instance is valid at once.
- ORPHAN_RESTORE an expert with no live replica gets a slot on a survivor (``repair_coverage``
                 decides which) and its weights come from the fastest tier that holds them:
                 pinned host copy, then disk shard. This is the critical path: the pause.
- REREPLICATION  after serving resumes, spare slots left on survivors take extra replicas of the
                 experts the failure left short, copied from surviving replicas on peer GPUs.

Timing model (contention-aware, fluid): every transfer loads the links it crosses (peer: source
egress + destination ingress; host: destination host-to-device; disk: the shared disk +
destination host-to-device). All of a phase's transfers run concurrently, so the phase lasts as
long as its busiest link needs for its bytes, and a transfer finishes by the time the busiest
link it crosses drains.
"""

from __future__ import annotations

import enum
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from eep.errors import EEPError, PlacementError
from eep.repair.bandwidth import GB, Bandwidth
from eep.repair.tiers import DISK, HOST, PEER, ExpertSource, tier_order
from eep.state import NO_EXPERT, ExpertPlacement, Membership, repair_coverage
from eep.state.placement import ReplicaChooser


class RepairError(EEPError, RuntimeError):
    """A plan could not be carried out; nothing was applied."""


class StepKind(enum.Enum):
    ROUTING_ONLY = "routing-only"
    ORPHAN_RESTORE = "orphan-restore"
    REREPLICATION = "re-replication"


@dataclass(slots=True)
class Transfer:
    """One expert's weights moving into one physical slot."""

    layer: int  # placement layer index
    checkpoint_layer: int  # the layer id the tiers know it by
    logical_expert_id: int
    source_tier: str  # "peer", "host" or "disk"
    source_rank: int | None  # peer only
    source_slot: int | None  # peer only
    dst_rank: int
    dst_slot: int
    nbytes: int
    predicted_s: float = 0.0


@dataclass
class RepairPlan:
    """What it takes to make the instance valid after ``epoch``'s failures, and how long."""

    epoch: int
    old_placement: ExpertPlacement
    placement: ExpertPlacement  # valid once ``restores`` are done: the switch at the end of the pause
    final_placement: ExpertPlacement  # after re-replication too
    restores: list[Transfer]
    rereplications: list[Transfer]
    bandwidth: Bandwidth
    predicted_pause_s: float
    predicted_background_s: float
    num_dropped_slots: int
    # only with ``allow_uncovered``: experts no slot could take ({layer: [expert]}) and the slots
    # per layer that are missing for them. Such a plan's placement is not EP-valid: it must not serve.
    uncovered: dict[int, list[int]] = field(default_factory=dict)
    num_missing_slots: int = 0

    @property
    def is_covered(self) -> bool:
        return not self.uncovered

    @property
    def steps(self) -> list[StepKind]:
        kinds = [StepKind.ROUTING_ONLY] if self.num_dropped_slots else []
        kinds += [StepKind.ORPHAN_RESTORE] if self.restores else []
        return kinds + ([StepKind.REREPLICATION] if self.rereplications else [])

    @property
    def is_routing_only(self) -> bool:
        return not self.restores

    @property
    def restore_nbytes(self) -> int:
        return sum(t.nbytes for t in self.restores)

    def nbytes_by_tier(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for t in self.restores + self.rereplications:
            out[t.source_tier] += t.nbytes
        return dict(out)

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "placement": self.placement.to_dict(),
                "final_placement": self.final_placement.to_dict(),
                "restores": [asdict(t) for t in self.restores],
                "rereplications": [asdict(t) for t in self.rereplications],
                "bandwidth": self.bandwidth.to_dict(), "predicted_pause_s": self.predicted_pause_s,
                "predicted_background_s": self.predicted_background_s, "steps": [s.value for s in self.steps],
                "uncovered": {str(layer): experts for layer, experts in self.uncovered.items()},
                "num_missing_slots": self.num_missing_slots}

    def execute(self, executor: "RepairExecutor") -> "ExecutionReport":
        """Run the critical phase: stage every restore, then switch the maps in one commit."""
        return run_transfers(executor, self.restores, self.placement, self.epoch)

    def execute_rereplication(self, executor: "RepairExecutor") -> "ExecutionReport":
        """Run the background phase (after serving resumed) and switch to ``final_placement``."""
        return run_transfers(executor, self.rereplications, self.final_placement, self.epoch)


@dataclass
class ExecutionReport:
    observed_s: list[float] = field(default_factory=list)  # per transfer, same order as the plan
    served_by: list[str] = field(default_factory=list)  # tier that actually served each transfer ("held": none needed)
    fallbacks: list[str] = field(default_factory=list)  # one line per tier that failed and why
    total_s: float = 0.0  # wall time from the first copy to the switch, waiting for copies in flight included
    # per batch of transfers of one layer: {"layer", "transfers", "seconds"}; on a GPU the seconds are
    # the copy stream's own time between the batch's events, on a CPU the wall time of its copies
    batches: list[dict] = field(default_factory=list)

    @property
    def num_copied(self) -> int:
        """Transfers that moved bytes (not already held by their destination)."""
        return sum(s != HELD for s in self.served_by)

    def by_tier(self, transfers: Sequence[Transfer]) -> dict[str, dict]:
        """``{tier: {"experts", "nbytes", "seconds"}}`` of the copies made (``transfers`` as run)."""
        out: dict[str, dict] = {}
        for t, tier, seconds in zip(transfers, self.served_by, self.observed_s):
            if tier == HELD:
                continue
            acc = out.setdefault(tier, {"experts": 0, "nbytes": 0, "seconds": 0.0})
            acc["experts"] += 1
            acc["nbytes"] += t.nbytes
            acc["seconds"] += seconds
        return out


HELD = "held"  # ExecutionReport.served_by of a transfer whose destination already held the expert


class RepairExecutor:
    """What a plan needs from whoever holds the weights (simulated ranks, or a real rank).

    ``stage`` loads one transfer's bytes without touching any slot that serves (so a failure
    part-way applies nothing); ``commit`` writes what was staged, waits for copies in flight and
    switches the maps in one step; ``discard`` drops what was staged. ``tiers`` are tried in order
    on fallback. ``holds`` says a transfer's destination already holds its expert (nothing to copy);
    ``batch_times`` reports the copies per layer batch once committed.
    """

    tiers: Sequence[ExpertSource] = ()
    epoch: int = 0

    def holds(self, transfer: Transfer) -> bool:
        return False

    def stage(self, transfer: Transfer, tier: ExpertSource | None) -> float:  # returns seconds
        raise NotImplementedError

    def commit(self, placement: ExpertPlacement, epoch: int) -> None:
        raise NotImplementedError

    def discard(self) -> None:
        raise NotImplementedError

    def batch_times(self) -> list[dict]:
        return []


def run_transfers(executor: RepairExecutor, transfers: Sequence[Transfer], placement: ExpertPlacement,
                  epoch: int) -> ExecutionReport:
    """Stage ``transfers`` with per-transfer tier fallback, then commit ``placement`` atomically."""
    import time

    if executor.epoch != epoch:
        raise RepairError(f"plan is for epoch {epoch} but the executor is at epoch {executor.epoch}: re-plan")
    report = ExecutionReport()
    start = time.perf_counter()
    try:
        for transfer in transfers:
            if executor.holds(transfer):
                report.observed_s.append(0.0)
                report.served_by.append(HELD)
                continue
            seconds, served_by = stage_with_fallback(executor, transfer, report.fallbacks)
            report.observed_s.append(seconds)
            report.served_by.append(served_by)
        executor.commit(placement, epoch)
    except BaseException:
        executor.discard()
        raise
    report.total_s = time.perf_counter() - start
    report.batches = executor.batch_times()
    return report


def stage_with_fallback(executor: RepairExecutor, transfer: Transfer, fallbacks: list[str]) -> tuple[float, str]:
    """Stage one transfer from its planned source, else from the next tier that holds the expert
    (a peer first when planned, then the tiers fastest first); ``(seconds, source that served)``.
    Raises ``RepairError`` when none can; each failure is appended to ``fallbacks``."""
    tiers = tier_order(list(executor.tiers))
    candidates: list[ExpertSource | None] = [None] if transfer.source_tier == PEER else []
    planned = [t for t in tiers if t.name == transfer.source_tier]
    candidates += planned + [t for t in tiers if t not in planned]
    for tier in candidates:
        if tier is not None and not tier.has_expert(transfer.checkpoint_layer, transfer.logical_expert_id):
            continue
        try:
            return executor.stage(transfer, tier), PEER if tier is None else tier.name
        except (EEPError, OSError, ValueError, KeyError, RuntimeError) as exc:
            fallbacks.append(f"layer {transfer.checkpoint_layer} expert {transfer.logical_expert_id}: "
                             f"{PEER if tier is None else tier.name} tier failed ({exc}); trying the next tier")
    raise RepairError(f"no tier could restore layer {transfer.checkpoint_layer} expert "
                      f"{transfer.logical_expert_id} into rank {transfer.dst_rank} slot {transfer.dst_slot}: "
                      + "; ".join(fallbacks[-3:]))


ExpertBytes = int | Callable[[int, int], int]


def plan_repair(placement: ExpertPlacement, before: Membership, after: Membership,
                tiers: Sequence[ExpertSource] | None = None, bandwidth: Bandwidth | None = None, *,
                expert_nbytes: ExpertBytes | None = None, load: torch.Tensor | None = None,
                layer_ids: Sequence[int] | None = None, rereplicate: bool = True,
                allow_uncovered: bool = False) -> RepairPlan:
    """Plan the repair of ``placement`` for the failures between ``before`` and ``after``.

    Parameters:
        placement: the maps in force under ``before``.
        tiers: host/disk sources for orphans, as the planner knows them (``name``, ``has_expert``;
            ``DeclaredTier`` when the bytes are in other processes); ``None`` means only what
            survivors hold (an orphan then raises ``RepairError`` naming it).
        bandwidth: the link model; ``None`` means ``Bandwidth()`` defaults.
        expert_nbytes: bytes of one expert (int, or ``f(checkpoint_layer, expert)``); ``None``
            asks the tiers (``tier.expert_nbytes``) when a transfer needs it.
        load: ``[num_layers, num_experts]`` token counts, to aim re-replication at hot experts.
        layer_ids: checkpoint layer id of each placement layer (default ``0..num_layers-1``).
        allow_uncovered: when the survivors' slots cannot hold every orphan, restore what fits and
            report the rest in ``RepairPlan.uncovered`` instead of raising ``InsufficientSlotsError``.
    """
    _check_failure_transition(before, after)
    bandwidth = bandwidth or Bandwidth()
    tiers = tier_order(list(tiers or []))
    layer_ids = list(range(placement.num_layers)) if layer_ids is None else list(layer_ids)
    if len(layer_ids) != placement.num_layers:
        raise PlacementError(f"layer_ids has {len(layer_ids)} entries for {placement.num_layers} placement layers")
    nbytes_of = _nbytes_function(expert_nbytes, tiers)

    coverage = repair_coverage(placement, after, allow_uncovered=allow_uncovered)
    restores = []
    for a in coverage.assignments:
        ckpt_layer = layer_ids[a.layer]
        tier = next((t for t in tiers if t.has_expert(ckpt_layer, a.logical_expert_id)), None)
        if tier is None:
            raise RepairError(f"layer {ckpt_layer} expert {a.logical_expert_id} lost every replica and no tier "
                              f"holds it (tiers: {[t.name for t in tiers] or 'none'})")
        restores.append(Transfer(a.layer, ckpt_layer, a.logical_expert_id, tier.name, None, None, a.rank,
                                 a.phys_slot, nbytes_of(ckpt_layer, a.logical_expert_id)))
    restores, pause_s = predict_transfers(restores, bandwidth)

    rereplications, final = ([], coverage.placement)
    if rereplicate:
        rereplications, final = _plan_rereplication(coverage.placement, after, load, layer_ids, nbytes_of)
    rereplications, background_s = predict_transfers(rereplications, bandwidth)
    return RepairPlan(after.epoch, placement, coverage.placement, final, restores, rereplications, bandwidth,
                      pause_s, background_s, coverage.num_dropped_slots, coverage.uncovered,
                      coverage.num_missing_slots)


def _check_failure_transition(before: Membership, after: Membership) -> None:
    if before.num_ranks != after.num_ranks:
        raise PlacementError(f"before has {before.num_ranks} rank slots, after {after.num_ranks}")
    joined = [r for r in range(before.num_ranks) if after.is_active(r) and not before.is_active(r)]
    if joined:
        raise PlacementError(f"ranks {joined} join between before and after: use plan_reintegration")
    if after.epoch <= before.epoch:
        raise PlacementError(f"after.epoch={after.epoch} must be newer than before.epoch={before.epoch}")


def _nbytes_function(expert_nbytes: ExpertBytes | None, tiers: list[ExpertSource]) -> Callable[[int, int], int]:
    if isinstance(expert_nbytes, int):
        return lambda layer, expert: expert_nbytes
    if callable(expert_nbytes):
        return expert_nbytes
    sizer = next((t for t in tiers if hasattr(t, "expert_nbytes")), None)
    if sizer is not None:
        return sizer.expert_nbytes

    def unknown(layer: int, expert: int) -> int:
        raise PlacementError(f"the size of layer {layer} expert {expert} is unknown: pass expert_nbytes")
    return unknown


def live_slots_by_expert(row: list[int], slot_is_active: list[bool]) -> dict[int, list[int]]:
    """``{expert: [phys_slot, ...]}`` for the replicas of one layer on active ranks."""
    out: dict[int, list[int]] = {}
    for phys, expert in enumerate(row):
        if expert != NO_EXPERT and slot_is_active[phys]:
            out.setdefault(expert, []).append(phys)
    return out


@dataclass
class Rereplication:
    """Spare slots of active ranks filled with extra replicas, copied from live replicas on peers."""

    placement: ExpertPlacement  # the maps once every transfer is done
    transfers: list[Transfer]
    predicted_s: float


def plan_rereplication(placement: ExpertPlacement, membership: Membership, *, bandwidth: Bandwidth | None = None,
                       expert_nbytes: ExpertBytes | None = None, load: torch.Tensor | None = None,
                       layer_ids: Sequence[int] | None = None) -> Rereplication:
    """Fill the spare slots of active ranks with replicas of the highest load-per-replica experts
    (uniform load: the fewest replicas), each copied from a live replica on a peer (reads spread
    over the source ranks). What ``plan_repair`` plans as its background phase, and what the runtime
    runs after a repair once serving resumed, so the next failure is routing-only where slots allow.

    An expert with no live replica is not re-replicated (it needs a restore, not a copy)."""
    bandwidth = bandwidth or Bandwidth()
    layer_ids = list(range(placement.num_layers)) if layer_ids is None else list(layer_ids)
    transfers, final = _plan_rereplication(placement, membership, load, layer_ids,
                                           _nbytes_function(expert_nbytes, []))
    transfers, predicted_s = predict_transfers(transfers, bandwidth)
    return Rereplication(final, transfers, predicted_s)


def _plan_rereplication(placement: ExpertPlacement, membership: Membership, load: torch.Tensor | None,
                        layer_ids: list[int], nbytes_of: Callable[[int, int], int]
                        ) -> tuple[list[Transfer], ExpertPlacement]:
    """Fill spare slots on survivors with replicas of the highest load-per-replica experts."""
    slots = placement.slots_per_rank
    slot_is_active = membership.active_cpu.repeat_interleave(slots)
    spare = (placement.phys_to_logical == NO_EXPERT) & slot_is_active
    if not bool(spare.any()):
        return [], placement
    active_list = slot_is_active.tolist()
    load = torch.ones(placement.num_layers, placement.num_experts, dtype=torch.float64) if load is None \
        else torch.as_tensor(load, dtype=torch.float64).expand(placement.num_layers, -1)
    new_p2l = placement.phys_to_logical.clone()
    transfers = []
    source_use: dict[int, int] = defaultdict(int)  # spread peer reads over source ranks
    spare_layers = spare.any(1).nonzero().flatten().tolist()
    for layer, row, load_row in zip(spare_layers, new_p2l[spare_layers].tolist(), load[spare_layers].tolist()):
        sources = live_slots_by_expert(row, active_list)  # the live replicas before this plan's copies
        counts = [len(sources.get(e, ())) for e in range(placement.num_experts)]
        chooser = ReplicaChooser(load_row, counts)
        no_source = {e for e, c in enumerate(counts) if c == 0}
        for phys in spare[layer].nonzero().flatten().tolist():
            rank = phys // slots
            expert = chooser.take(set(row[rank * slots:(rank + 1) * slots]) | no_source)
            if expert is None:
                continue
            src = min(sources[expert], key=lambda p: (source_use[p // slots], p))
            source_use[src // slots] += 1
            row[phys] = expert
            transfers.append(Transfer(layer, layer_ids[layer], expert, PEER, src // slots, src, rank, phys,
                                      nbytes_of(layer_ids[layer], expert)))
        new_p2l[layer] = torch.tensor(row, dtype=torch.int64)
    final = ExpertPlacement.from_phys_to_logical(new_p2l, num_ranks=placement.num_ranks, slots_per_rank=slots,
                                                 num_experts=placement.num_experts)
    return transfers, final


def _links(t: Transfer, bandwidth: Bandwidth) -> list[tuple]:
    if bandwidth.is_shared_host:  # simulated ranks on one CPU: every copy goes through one memory system
        return [("disk", 0), ("h2d",)] if t.source_tier == DISK else [("h2d",)]
    if t.source_tier == PEER:
        if bandwidth.node_of(t.source_rank) != bandwidth.node_of(t.dst_rank):
            return [("nic_out", t.source_rank), ("nic_in", t.dst_rank)]
        return [("peer_out", t.source_rank), ("peer_in", t.dst_rank)]
    if t.source_tier == HOST:
        return [("h2d", t.dst_rank)]
    if t.source_tier == DISK:
        return [("disk", bandwidth.node_of(t.dst_rank)), ("h2d", t.dst_rank)]
    return [(t.source_tier,), ("h2d", t.dst_rank)]  # an unknown tier: its own link, then host-to-device


def _link_gbps(link: tuple, bandwidth: Bandwidth) -> float:
    kind = link[0]
    if kind in ("peer_out", "peer_in"):
        return bandwidth.peer_gbps
    if kind == "h2d":
        return bandwidth.h2d_gbps
    if kind in ("nic_out", "nic_in"):
        return bandwidth.nic_gbps
    return bandwidth.disk_gbps


def predict_transfers(transfers: list[Transfer], bandwidth: Bandwidth) -> tuple[list[Transfer], float]:
    """Fill in ``predicted_s`` per transfer (all run concurrently) and return the phase's predicted duration."""
    if not transfers:
        return [], 0.0
    links = [_links(t, bandwidth) for t in transfers]
    link_bytes: dict[tuple, int] = defaultdict(int)
    for t, crossed in zip(transfers, links):
        for link in crossed:
            link_bytes[link] += t.nbytes
    drain_s = {link: nbytes / (_link_gbps(link, bandwidth) * GB) for link, nbytes in link_bytes.items()}
    for t, crossed in zip(transfers, links):
        t.predicted_s = max(drain_s[link] for link in crossed)
    return transfers, max(drain_s.values())
