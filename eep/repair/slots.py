"""``ExpertSlots``: one MoE layer's per-slot expert weights, membership and placement, repaired by plan.

The state every EP MoE layer shares, whatever computes its forward: the reference oracle
(``eep.reference.ExpertParallelMoE``) and the fused layer (``eep.fused.MoELayer``) both subclass it,
so placement, repair planning and the executor that carries the plans out exist once.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import torch

from eep.fp8 import ExpertWeight, Fp8Weight, empty_like_weight, weight_nbytes
from eep.repair.bandwidth import Bandwidth
from eep.repair.plan import ExecutionReport, RepairError, RepairExecutor, RepairPlan, Transfer, plan_repair
from eep.repair.reintegration import ReintegrationPlan, plan_reintegration
from eep.repair.tiers import ExpertSource, TensorTier
from eep.state import NO_EXPERT, ExpertPlacement, Membership, ValidityReport, check_validity


class ExpertSlots:
    """The expert weights of one MoE layer on ``num_ranks`` rank slots, with failure and rejoin.

    Weights are held per physical slot (``slot_w_gate[phys_slot]`` ...), as a real rank holds
    them: tensors, or block-scaled FP8 (``eep.fp8.Fp8Weight`` stacks: e4m3 weights with their 128x128
    scales, which repair moves together). A failed rank's slots are poisoned with NaN, so any path that
    still read them would show in the output.

    Coverage repair on ``fail`` follows ``eep.plan_repair``: experts that keep a live replica
    are re-routed (no copy); an expert that lost every replica is restored into a spare or donor
    slot from the fastest of ``tiers`` that holds it (default: a host tier over the weights this
    object was built from; pass ``weights_tools`` Host/Disk tiers for the real thing, with
    ``layer_id`` naming this layer in them). A corrupt tier falls back to the next one; if none
    can serve, nothing changes. ``join`` follows ``eep.plan_reintegration``. The plans run through
    ``SlotExecutor``. Subclasses add the forward: ``eep.reference.ExpertParallelMoE`` (the oracle)
    and ``eep.fused.MoELayer``.
    """

    def __init__(self, w_gate: ExpertWeight, w_up: ExpertWeight, w_down: ExpertWeight, num_ranks: int,
                 slots_per_rank: int, top_k: int, renormalize: bool = True, *,
                 placement: ExpertPlacement | None = None, load: torch.Tensor | None = None,
                 num_redundant: int | None = None, max_tokens_per_rank: int | None = None,
                 tiers: list[ExpertSource] | None = None, layer_id: int = 0, bandwidth: Bandwidth | None = None):
        _check_weights(w_gate, w_up, w_down)
        num_experts = w_gate.shape[0]
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        self.num_experts = num_experts
        self.hidden_size = w_gate.shape[2]
        self.top_k = top_k
        self.renormalize = renormalize
        self.max_tokens_per_rank = max_tokens_per_rank
        self.membership = Membership(num_ranks)
        if placement is None:
            placement = ExpertPlacement.build(1, num_experts, num_ranks, slots_per_rank, load,
                                              num_redundant=num_redundant)
        elif (placement.num_layers, placement.num_experts, placement.num_ranks, placement.slots_per_rank) != \
                (1, num_experts, num_ranks, slots_per_rank):
            raise ValueError(f"{placement} does not match 1 layer, {num_experts} experts, {num_ranks} ranks x "
                             f"{slots_per_rank} slots")
        self.placement = placement.clone()
        self.layer_id = layer_id
        self.tiers = list(tiers) if tiers is not None else [TensorTier({layer_id: (w_gate, w_up, w_down)})]
        self.bandwidth = bandwidth
        self.last_report: ExecutionReport | None = None
        num_phys = num_ranks * slots_per_rank
        self.is_fp8 = isinstance(w_gate, Fp8Weight)
        self.slot_w_gate, self.slot_w_up, self.slot_w_down = (_poisoned_slots(w, num_phys)
                                                              for w in (w_gate, w_up, w_down))
        for phys, expert in enumerate(self.placement.phys_to_logical[0].tolist()):
            if expert != NO_EXPERT:
                self.slot_w_gate[phys].copy_(w_gate[expert])
                self.slot_w_up[phys].copy_(w_up[expert])
                self.slot_w_down[phys].copy_(w_down[expert])

    @property
    def num_ranks(self) -> int:
        return self.membership.num_ranks

    @property
    def slots_per_rank(self) -> int:
        return self.placement.slots_per_rank

    # ---- membership transitions ----
    def fail(self, ranks: int | Iterable[int], *, rereplicate: bool = False) -> RepairPlan:
        """Ranks die: drop their slots, restore orphans from the tiers. All-or-nothing.

        ``rereplicate=True`` also runs the background phase (spare slots take extra replicas);
        by default spare slots stay free for the next failure's orphans.
        """
        after = self.membership.after_failure(ranks)  # validates; raises before any change
        plan = plan_repair(self.placement, self.membership, after, self.tiers, self.bandwidth,
                           layer_ids=[self.layer_id], rereplicate=rereplicate, expert_nbytes=self._expert_nbytes)
        self.last_report = plan.execute(SlotExecutor(self, after, self.tiers))
        if rereplicate:
            plan.execute_rereplication(SlotExecutor(self, after, self.tiers))
        return plan

    def join(self, rank: int, *, load: torch.Tensor | None = None) -> ReintegrationPlan:
        """A repaired ``rank`` comes back; survivors keep their slots and only serve as copy sources."""
        after = self.membership.after_join(rank)
        plan = plan_reintegration(self.placement, self.membership, rank, load, tiers=self.tiers,
                                  bandwidth=self.bandwidth, layer_ids=[self.layer_id],
                                  expert_nbytes=self._expert_nbytes)
        self.last_report = plan.execute(SlotExecutor(self, after, self.tiers))
        return plan

    def validity(self) -> ValidityReport:
        return check_validity(self.membership, self.placement)

    # ---- weights ----
    @property
    def _expert_nbytes(self) -> int:
        """Bytes one expert's restore moves: weights, plus their block scales for FP8 experts."""
        return sum(weight_nbytes(w[0]) for w in (self.slot_w_gate, self.slot_w_up, self.slot_w_down))

    def poison_slots(self, phys_slots: Iterable[int]) -> None:
        """Fill slots with NaN: what a dead rank held must never be read again."""
        for phys in phys_slots:
            for w in (self.slot_w_gate, self.slot_w_up, self.slot_w_down):
                w[phys].fill_(float("nan"))


class SlotExecutor(RepairExecutor):
    """Executor over one ``ExpertSlots``; commits ``new_membership`` together with the maps.

    A slot that serves nothing right now (spare, or on a rank outside the current routing) is
    written directly: no route reads it until the map switch. A slot that still serves (a donor
    replica) is staged in a side buffer and overwritten only by ``commit``. So a corrupt shard or a
    missing expert half-way leaves every serving slot and the maps exactly as they were.
    """

    def __init__(self, moe: "ExpertSlots", new_membership: Membership, tiers: Sequence[ExpertSource]):
        self.moe = moe
        self.new_membership = new_membership
        self.epoch = new_membership.epoch
        self.tiers = list(tiers)
        self.staged: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.written_in_place: list[int] = []

    def stage(self, transfer: Transfer, tier: ExpertSource | None) -> float:
        moe = self.moe
        start = time.perf_counter()
        dst = transfer.dst_slot
        if self._serves(dst):
            weights = (empty_like_weight(moe.slot_w_gate[dst]), empty_like_weight(moe.slot_w_up[dst]),
                       empty_like_weight(moe.slot_w_down[dst]))
            self.staged[dst] = weights
        else:
            weights = (moe.slot_w_gate[dst], moe.slot_w_up[dst], moe.slot_w_down[dst])
            self.written_in_place.append(dst)
        if tier is None:  # peer replica: read the live source slot
            src = transfer.source_slot
            if src is None or not self.new_membership.is_active(src // moe.slots_per_rank):
                raise RepairError(f"peer source slot {src} is not on an active rank")
            for w, slot_w in zip(weights, (moe.slot_w_gate, moe.slot_w_up, moe.slot_w_down)):
                w.copy_(slot_w[src])
        else:
            tier.copy_expert_into(transfer.checkpoint_layer, transfer.logical_expert_id, *weights)
        return time.perf_counter() - start

    def _serves(self, phys: int) -> bool:
        moe = self.moe
        return (int(moe.placement.phys_to_logical[0, phys]) != NO_EXPERT
                and moe.membership.is_active(phys // moe.slots_per_rank))

    def commit(self, placement: ExpertPlacement, epoch: int) -> None:
        moe = self.moe
        for phys, (w_gate, w_up, w_down) in self.staged.items():
            moe.slot_w_gate[phys].copy_(w_gate)
            moe.slot_w_up[phys].copy_(w_up)
            moe.slot_w_down[phys].copy_(w_down)
        self.staged.clear()
        self.written_in_place.clear()
        s = moe.slots_per_rank
        for rank in range(moe.num_ranks):
            if not self.new_membership.is_active(rank):
                moe.poison_slots(range(rank * s, (rank + 1) * s))
        moe.membership.copy_from(self.new_membership)
        moe.placement.copy_(placement)

    def discard(self) -> None:
        self.staged.clear()
        self.moe.poison_slots(self.written_in_place)  # they served nothing before; make sure of it
        self.written_in_place.clear()


def _poisoned_slots(w: ExpertWeight, num_phys: int) -> ExpertWeight:
    """NaN-filled per-slot storage shaped like one expert of the stack ``w`` (an ``Fp8Weight`` stack
    gets FP8 weights and float32 scales, both NaN)."""
    if isinstance(w, Fp8Weight):
        return Fp8Weight(torch.full((num_phys, *w.weight.shape[1:]), float("nan"), dtype=w.weight.dtype),
                         torch.full((num_phys, *w.scale.shape[1:]), float("nan"), dtype=torch.float32))
    return torch.full((num_phys, *w.shape[1:]), float("nan"), dtype=w.dtype)


def _check_weights(w_gate: ExpertWeight, w_up: ExpertWeight, w_down: ExpertWeight) -> None:
    kinds = {isinstance(w, Fp8Weight) for w in (w_gate, w_up, w_down)}
    if len(kinds) != 1:
        raise ValueError("w_gate, w_up and w_down must all be tensors or all be Fp8Weight (FP8 with block scales)")
    if kinds.pop():
        for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
            if w.weight.dtype != torch.float8_e4m3fn or w.scale.dtype != torch.float32:
                raise ValueError(f"{name} is {w.weight.dtype} with {w.scale.dtype} scales, expected "
                                 "float8_e4m3fn with float32 scales")
        w_gate, w_up, w_down = w_gate.weight, w_up.weight, w_down.weight
    if w_gate.dim() != 3:
        raise ValueError(f"w_gate has shape {tuple(w_gate.shape)}, expected [num_experts, intermediate, hidden]")
    num_experts, inter, hidden = w_gate.shape
    if tuple(w_up.shape) != (num_experts, inter, hidden):
        raise ValueError(f"w_up has shape {tuple(w_up.shape)}, expected {(num_experts, inter, hidden)} like w_gate")
    if tuple(w_down.shape) != (num_experts, hidden, inter):
        raise ValueError(f"w_down has shape {tuple(w_down.shape)}, expected {(num_experts, hidden, inter)}")
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if not w.is_floating_point():
            raise ValueError(f"{name} has dtype {w.dtype}, expected a floating type")
        if w.dtype != w_gate.dtype:
            raise ValueError(f"{name} has dtype {w.dtype} but w_gate has {w_gate.dtype}")
