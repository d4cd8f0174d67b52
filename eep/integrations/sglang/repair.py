"""Repair by eep's plan inside SGLang: a rank fault (or rejoin) in SGLang's elastic state becomes
``eep.plan_repair`` (``eep.plan_reintegration``), executed by ``eep.repair.SlotExecutor`` over
SGLang's own expert weight tensors, then written into SGLang's expert-location maps in place.

    repair = PlanRepair(rank, num_ranks, model.routed_experts_weights_of_layer, tiers=[HostTier(...)])
    result = repair.on_failure(metadata, before_active, after_active)   # or on_rejoin(...)
    logger.info(result.log_line())

What one rank does (every rank computes the same plan from the same maps and membership):

1. ``placement_from_sglang`` over the MoE rows of the maps, the slots of inactive ranks empty;
2. the plan: routing-only drops, then orphan restores into donor slots (SGLang's maps have no spare
   slot: a survivor's slot that held a second replica of some expert takes the orphan). When the
   survivors cannot cover every expert: ``CoverageLostError`` naming them, nothing written;
3. this rank's transfers (``dst_rank == rank``) through ``SlotExecutor`` over ``SGLangExpertSlots``:
   a donor slot that still serves is staged and overwritten only at the commit; the sources are the
   configured tiers (host, disk: ``weights_tools``) and, for a peer replica, a store of this process
   (``peers``: simulated ranks in one process). A peer in another process cannot be read here: the
   executor falls back to the tiers and says so in ``fallbacks``;
4. the vote (``before_commit``): every live rank says its copies are staged, bounded by a deadline;
   a "no" or a silent peer aborts everywhere, nothing switched;
5. the switch: the slots' new contents count, and the maps are written in place (``write_placement_``),
   so captured CUDA graphs read them without a recapture.

The weight layout eep's plan moves: per MoE layer exactly ``[w13 [S, 2I, H], w2 [S, H, I]]`` (gate
rows then up rows, SGLang's unquantised ``FusedMoE``), one float dtype. Anything else (a quantised
layout with scales, shared experts fused into the slots) is refused with ``UnsupportedLayoutError``
before anything moves; the hook then falls back to SGLang's own rebalance.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from eep.errors import CoverageLostError
from eep.integrations.sglang.placement import placement_from_sglang, write_placement_
from eep.repair import (Bandwidth, ExecutionReport, ExpertSource, RepairError, SlotExecutor, Transfer,
                        plan_reintegration, plan_repair, run_transfers)
from eep.repair.plan import HELD
from eep.repair.slots import OneRankSlots
from eep.state import NO_EXPERT, ExpertPlacement, Membership


class UnsupportedLayoutError(RepairError):
    """SGLang's expert weights are not in a layout eep's plan can move (the hook falls back to SGLang)."""


class SGLangExpertSlots(OneRankSlots):
    """The ``eep.repair.SlotStore`` over one rank's SGLang expert weights (module docstring).

    Parameters:
        weights_of_layer: ``{layer_id: [w13 [S, 2I, H], w2 [S, H, I]]}`` (SGLang's
            ``model.routed_experts_weights_of_layer``); the tensors are written in place.
        rank, layer_ids: this rank, and the SGLang layer id of each placement layer.
        placement, active: the maps and membership in force (what the slots hold).
        on_switch: called with the new placement and membership at the switch (the map write).
        peers: ``{rank: SGLangExpertSlots}`` of other ranks in this process (simulated ranks).
    """

    def __init__(self, weights_of_layer: Mapping[int, Sequence[torch.Tensor]], *, rank: int, layer_ids: Sequence[int],
                 placement: ExpertPlacement, active: Sequence[bool],
                 on_switch: Callable[[ExpertPlacement, Membership], None] | None = None,
                 peers: Mapping[int, "SGLangExpertSlots"] | None = None):
        self.rank, self.layer_ids = rank, list(layer_ids)
        self.slots_per_rank = placement.slots_per_rank
        self.w13, self.w2 = [], []
        for layer in self.layer_ids:
            w13, w2 = check_layout(layer, weights_of_layer.get(layer), self.slots_per_rank)
            self.w13.append(w13)
            self.w2.append(w2)
        self.inter = self.w2[0].shape[2]
        device = self.w13[0].device
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.placement, self.active = placement, list(active)
        S = self.slots_per_rank
        # what the bytes hold: SGLang loaded them by the maps in force (an inactive rank: nothing known)
        self.loaded = placement.phys_to_logical[:, rank * S:(rank + 1) * S].clone()
        self.on_switch = on_switch
        self.peers = dict(peers or {})

    @property
    def expert_nbytes(self) -> int:
        return 3 * self.inter * self.w13[0].shape[2] * self.w13[0].element_size()

    # ---- SlotStore (the bookkeeping: OneRankSlots) ----
    def views(self, layer: int, phys: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        i = self._local(phys)
        return self.w13[layer][i, :self.inter], self.w13[layer][i, self.inter:], self.w2[layer][i]

    def peer_views(self, layer: int, phys: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rank = phys // self.slots_per_rank
        if rank == self.rank:
            return self.views(layer, phys)
        if rank not in self.peers:
            raise RepairError(f"rank {rank}'s expert weights are in another process: the SGLang plugin reads no "
                              f"peer GPU (slot {phys} of layer {self.layer_ids[layer]})")
        return self.peers[rank].views(layer, phys)

    def layer_name(self, layer: int) -> int:
        return self.layer_ids[layer]

    def switch(self, placement: ExpertPlacement, membership: Membership) -> None:
        self.check_holds(placement)  # never route to a slot whose bytes are another expert's
        if self.on_switch is not None:
            self.on_switch(placement, membership)
        self.placement, self.active = placement, membership.active_cpu.tolist()


def check_layout(layer: int, weights: Sequence[torch.Tensor] | None, slots_per_rank: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w13, w2)`` of one MoE layer, or ``UnsupportedLayoutError`` saying what differs."""
    if weights is None:
        raise UnsupportedLayoutError(f"the model has no routed expert weights for layer {layer}")
    if len(weights) != 2:
        raise UnsupportedLayoutError(f"layer {layer} has {len(weights)} routed expert tensors "
                                     f"{[tuple(w.shape) for w in weights]}; eep's plan moves exactly w13 and w2 "
                                     f"(a quantised layout carries scales)")
    w13, w2 = weights
    if w13.dim() != 3 or w2.dim() != 3 or w13.shape[0] != slots_per_rank or w2.shape[0] != slots_per_rank \
            or w13.shape[1] != 2 * w2.shape[2] or w13.shape[2] != w2.shape[1]:
        raise UnsupportedLayoutError(f"layer {layer}: w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} are not "
                                     f"[{slots_per_rank}, 2I, H] and [{slots_per_rank}, H, I]")
    if w13.dtype != w2.dtype or w13.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise UnsupportedLayoutError(f"layer {layer}: expert weights are {w13.dtype}/{w2.dtype}; eep's plan moves "
                                     f"bf16, fp16 or fp32 experts")
    return w13, w2


@dataclass
class PlanRepairResult:
    """What one rank did for one membership change, phase by phase.

    ``phases``: one dict per phase, ``{"phase", "predicted_s", "plan_predicted_s", "observed_s"}`` and, for
    a phase with copies, ``"experts"`` (copied here), ``"held"`` (already in place), ``"nbytes"`` and
    ``"experts_by_tier"``. ``predicted_s`` is this rank's part of the plan (its copies run concurrently),
    ``plan_predicted_s`` the whole plan's (the slowest rank's); ``observed_s`` this rank's copies, the
    vote and the switch. ``routing-only`` has ``dropped_slots`` and, as ``observed_s``, its map write.
    ``fallbacks``: each tier that failed and why, as the executor recorded them.
    """

    kind: str  # "repair" or "reintegration"
    rank: int
    epoch: int  # this process's count of changes applied (a rejoined process counts from 0)
    ranks: list[int]  # failed or joined
    placement: ExpertPlacement
    transfers: list[Transfer]
    report: ExecutionReport
    phases: list[dict] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    map_write_s: float = 0.0  # the in-place write of SGLang's maps at the switch

    def log_line(self) -> str:
        parts = []
        for p in self.phases:
            if p["phase"] == "routing-only":
                parts.append(f"routing-only: {p['dropped_slots']} slots dropped, maps written in {_ms(p['observed_s'])}")
            else:
                tiers = ", ".join(f"{n} from {t}" for t, n in sorted(p["experts_by_tier"].items())) or "none here"
                parts.append(f"{p['phase']}: {p['experts']} experts ({tiers}), predicted {_ms(p['predicted_s'])} "
                             f"(plan {_ms(p['plan_predicted_s'])}), observed {_ms(p['observed_s'])}")
        fallbacks = f"; {len(self.fallbacks)} tier fallbacks ({self.fallbacks[0]})" if self.fallbacks else ""
        what = "down" if self.kind == "repair" else "back"
        return f"eep: {self.kind} by plan, epoch {self.epoch}, ranks {self.ranks} {what}, rank {self.rank}: " \
               + "; ".join(parts) + fallbacks


Vote = Callable[[str, bool, Sequence[bool]], None]  # (plan key, ok, voters' mask): raise unless every voter said yes


class PlanRepair:
    """eep's plan for one SGLang rank's expert weights (module docstring).

    Parameters:
        rank, num_ranks: this rank and SGLang's ``ep_size``.
        weights_of_layer: ``model.routed_experts_weights_of_layer`` (its keys are the MoE layers).
        tiers: orphan sources (``weights_tools.HostTier``/``DiskTier``, ``eep.repair.TensorTier``),
            tier layer ids being SGLang's layer ids.
        bandwidth: the link model the plan predicts with (default ``Bandwidth()``).
        vote: the agreement of the ranks in other processes before a switch (``StoreVote``); None: one
            process holds every rank that copies (a single process, or simulated ranks with ``peers``).
        peers: other ranks' ``PlanRepair`` in this process, read as peer sources.
    """

    def __init__(self, rank: int, num_ranks: int, weights_of_layer: Mapping[int, Sequence[torch.Tensor]], *,
                 tiers: Sequence[ExpertSource] = (), bandwidth: Bandwidth | None = None, vote: Vote | None = None,
                 peers: Mapping[int, "PlanRepair"] | None = None):
        self.rank, self.num_ranks = rank, num_ranks
        self.weights_of_layer = weights_of_layer
        self.layer_ids = sorted(int(k) for k in weights_of_layer)
        if not self.layer_ids:
            raise UnsupportedLayoutError("the model has no routed expert weights")
        self.tiers = list(tiers)
        self.bandwidth = bandwidth or Bandwidth()
        self.vote = vote
        self.peers = peers if peers is not None else {}
        self.epoch = 0
        self.store: SGLangExpertSlots | None = None

    def _slots(self, metadata: Any, before: Membership) -> tuple[ExpertPlacement, SGLangExpertSlots]:
        if int(metadata.ep_size) != self.num_ranks:
            raise UnsupportedLayoutError(f"the maps have ep_size={metadata.ep_size}, this rank was set up for "
                                         f"{self.num_ranks} ranks")
        placement = placement_from_sglang(metadata, active=before.active_cpu.tolist(), layers=self.layer_ids)
        if self.store is None:
            self.store = SGLangExpertSlots(self.weights_of_layer, rank=self.rank, layer_ids=self.layer_ids,
                                           placement=placement, active=before.active_cpu.tolist())
        else:  # what the maps say now (SGLang may have rebalanced since): the slots were loaded by them
            S = placement.slots_per_rank
            self.store.placement, self.store.active = placement, before.active_cpu.tolist()
            self.store.loaded = placement.phys_to_logical[:, self.rank * S:(self.rank + 1) * S].clone()
        self.store.peers = {r: p._store_for(metadata, before) for r, p in self.peers.items() if r != self.rank}
        return placement, self.store

    def _store_for(self, metadata: Any, before: Membership) -> SGLangExpertSlots:
        if self.store is None:
            self._slots(metadata, before)
        return self.store

    def on_failure(self, metadata: Any, before_active: Sequence[bool], after_active: Sequence[bool]
                   ) -> PlanRepairResult:
        """Ranks active in ``before_active`` but not in ``after_active`` died: repair by plan.
        Raises ``CoverageLostError`` (nothing written) when the survivors cannot cover every expert."""
        before = Membership(self.num_ranks, active=[bool(a) for a in before_active], epoch=self.epoch)
        after = Membership(self.num_ranks, active=[bool(a) for a in after_active], epoch=self.epoch + 1)
        placement, store = self._slots(metadata, before)
        plan = plan_repair(placement, before, after, self.tiers, self.bandwidth, expert_nbytes=store.expert_nbytes,
                           layer_ids=self.layer_ids, rereplicate=False, allow_uncovered=True)
        if not plan.is_covered:
            raise CoverageLostError({self.layer_ids[layer]: experts for layer, experts in plan.uncovered.items()},
                                    plan.num_missing_slots, placement.slots_per_rank)
        failed = [r for r in range(self.num_ranks) if before.is_active(r) and not after.is_active(r)]
        mine = [t for t in plan.restores if t.dst_rank == self.rank]
        key = _plan_key(placement, before, after)
        result = self._execute(metadata, store, after, plan.placement, mine, "repair", failed, key)
        result.phases.insert(0, {"phase": "routing-only", "dropped_slots": plan.num_dropped_slots,
                                 "predicted_s": 0.0, "plan_predicted_s": 0.0, "observed_s": result.map_write_s})
        if plan.restores:
            result.phases.append(_phase("orphan-restore", mine, plan.predicted_pause_s, result.report))
        return result

    def on_rejoin(self, metadata: Any, before_active: Sequence[bool], joined: Sequence[int]) -> PlanRepairResult:
        """``joined`` ranks come back (inactive in ``before_active``): ``eep.plan_reintegration`` fills
        their slots (survivors keep theirs), then the maps take them back."""
        before = Membership(self.num_ranks, active=[bool(a) for a in before_active], epoch=self.epoch)
        placement, store = self._slots(metadata, before)
        plan = plan_reintegration(placement, before, list(joined), tiers=self.tiers, bandwidth=self.bandwidth,
                                  expert_nbytes=store.expert_nbytes, layer_ids=self.layer_ids)
        after = Membership(self.num_ranks, active=[bool(a) or r in plan.ranks for r, a in enumerate(before_active)],
                           epoch=plan.epoch)
        mine = [t for t in plan.transfers if t.dst_rank == self.rank]
        key = _plan_key(placement, before, after)
        result = self._execute(metadata, store, after, plan.placement, mine, "reintegration", plan.ranks, key)
        result.phases.append(_phase("reintegration", mine, plan.predicted_s, result.report))
        return result

    def _execute(self, metadata: Any, store: SGLangExpertSlots, after: Membership, placement: ExpertPlacement,
                 mine: list[Transfer], kind: str, ranks: list[int], key: str) -> PlanRepairResult:
        map_s = [0.0]

        def write_maps(new: ExpertPlacement, membership: Membership) -> None:
            start = time.perf_counter()
            write_placement_(metadata, new, moe_ep_rank=self.rank, active=membership.active_cpu.tolist(),
                             layers=self.layer_ids)
            map_s[0] = time.perf_counter() - start

        voted = [False]

        def vote() -> None:
            voted[0] = True
            if self.vote is not None:
                self.vote(key, True, after.active_cpu.tolist())

        store.on_switch = write_maps
        executor = SlotExecutor(store, after, self.tiers, before_commit=vote)
        try:
            report = run_transfers(executor, mine, placement, after.epoch)
        except BaseException:
            if self.vote is not None and not voted[0]:
                self.vote(key, False, after.active_cpu.tolist())  # the others abort too, at once
            raise
        finally:
            store.on_switch = None
        self.epoch = after.epoch
        return PlanRepairResult(kind, self.rank, after.epoch, ranks, placement, mine, report,
                                fallbacks=list(report.fallbacks), map_write_s=map_s[0])


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


def _plan_key(placement: ExpertPlacement, before: Membership, after: Membership) -> str:
    """What every rank executing the same plan agrees on without talking: the maps and the change."""
    digest = hashlib.sha256(placement.phys_to_logical.numpy().tobytes())
    digest.update(bytes(before.active_cpu.tolist()) + b"/" + bytes(after.active_cpu.tolist()))
    return digest.hexdigest()[:16]


def _phase(name: str, mine: list[Transfer], plan_predicted_s: float, report: ExecutionReport) -> dict:
    by_tier = report.by_tier(mine)
    return {"phase": name, "predicted_s": max((t.predicted_s for t in mine), default=0.0),
            "plan_predicted_s": plan_predicted_s, "observed_s": report.total_s if mine else 0.0,
            "experts": report.num_copied, "held": sum(s == HELD for s in report.served_by),
            "nbytes": sum(v["nbytes"] for v in by_tier.values()),
            "experts_by_tier": {t: v["experts"] for t, v in by_tier.items()}}


class StoreVote:
    """The ranks' agreement before a switch, through a TCPStore (SGLang's global store).

    Each voter sets ``<prefix>/<round>/<rank>`` to ``1`` (staged) or ``0`` (failed), then waits at
    most ``timeout_s`` for every other voter's key: a ``0`` or a missing key raises ``RepairError``
    naming the ranks, so every rank discards and nothing switches. ``prefix`` digests the maps and
    the membership change, so only ranks executing the same plan meet; ``round`` counts arrivals
    under it, so the same change seen again later does not read the old votes.
    """

    def __init__(self, store: Any, rank: int, *, timeout_s: float, tag: str = "eep/sglang-repair"):
        self.store, self.rank, self.timeout_s, self.tag = store, rank, timeout_s, tag

    def __call__(self, plan_key: str, ok: bool, voters: Sequence[bool]) -> None:
        from datetime import timedelta

        who = [r for r, a in enumerate(voters) if a]
        prefix = f"{self.tag}/{plan_key}"
        round_ = (int(self.store.add(f"{prefix}/arrivals", 1)) - 1) // max(1, len(who))
        key = f"{prefix}/{round_}"
        self.store.set(f"{key}/{self.rank}", "1" if ok else "0")
        if not ok:
            return
        others = [r for r in who if r != self.rank]
        keys = [f"{key}/{r}" for r in others]
        try:
            if keys:
                self.store.wait(keys, timedelta(seconds=self.timeout_s))
        except RuntimeError as exc:  # the store's timeout
            silent = [r for r, k in zip(others, keys) if not self.store.check([k])]
            raise RepairError(f"ranks {silent} did not vote within {self.timeout_s:g} s: nothing switched") from exc
        refused = [r for r, k in zip(others, keys) if self.store.get(k) != b"1"]
        if refused:
            raise RepairError(f"ranks {refused} could not stage their part of the plan: nothing switched")


# ---- the process-wide set-up the hook uses (SGLang runs one model per process) ----
_configured: dict[str, Any] = {"tiers": None, "bandwidth": None}
_process_repair: dict[str, Any] = {"repair": None, "key": None}


def configure(*, tiers: Sequence[ExpertSource] | None = None, bandwidth: Bandwidth | None = None) -> None:
    """Set the tiers orphans are restored from and the bandwidth model, for this process's repairs
    (default: ``EEP_SGLANG_SHARD_DIR``'s host and disk tiers, or none; ``Bandwidth()``)."""
    _configured["tiers"] = None if tiers is None else list(tiers)
    _configured["bandwidth"] = bandwidth
    _process_repair["repair"] = None


def configured_tiers() -> list[ExpertSource]:
    if _configured["tiers"] is not None:
        return list(_configured["tiers"])
    from eep import envs

    shard_dir = envs.sglang_shard_dir()
    if shard_dir is None:
        return []
    from weights_tools import DiskTier, HostTier  # lazily: only where shards are configured
    from weights_tools.manifest import Manifest

    manifest = Manifest.load(shard_dir)  # SGLang's layer ids are the checkpoint's
    return [HostTier(shard_dir, manifest=manifest), DiskTier(shard_dir, manifest=manifest)]


def process_repair(rank: int, num_ranks: int, model: Any, vote: Vote | None) -> PlanRepair:
    """This process's ``PlanRepair`` over ``model.routed_experts_weights_of_layer`` (made once)."""
    weights = getattr(model, "routed_experts_weights_of_layer", None)
    if weights is None:
        raise UnsupportedLayoutError(f"{type(model).__name__} has no routed_experts_weights_of_layer")
    key = (rank, num_ranks, id(model))
    if _process_repair["key"] != key:
        _process_repair["repair"] = PlanRepair(rank, num_ranks, weights, tiers=configured_tiers(),
                                               bandwidth=_configured["bandwidth"], vote=vote)
        _process_repair["key"] = key
    repair = _process_repair["repair"]
    repair.vote = vote
    return repair
