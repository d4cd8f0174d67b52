"""Slots that plans write: the ``SlotStore`` seam, its one executor ``SlotExecutor``, and ``ExpertSlots``.

``ExpertSlots`` is one MoE layer's per-slot expert weights, membership and placement for simulated
ranks in one process: the state every in-process EP MoE layer shares, whatever computes its forward
(the reference oracle ``eep.reference.ExpertParallelMoE`` and the fused ``eep.fused.MoELayer`` both
subclass it). The runtime's rank engines hold their own slots (``eep.runtime.engines.slots``); every
one of them is a ``SlotStore``, so one executor carries out repair, reintegration and re-replication
plans over all of them, with the same staging, tier fallback and atomic switch.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

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
            self.poison(0, phys)

    # ---- the slot store (``SlotStore``) the executor writes ----
    copy_stream = None  # copies run on the caller's stream

    def views(self, layer: int, phys: int) -> tuple[ExpertWeight, ExpertWeight, ExpertWeight]:
        return self.slot_w_gate[phys], self.slot_w_up[phys], self.slot_w_down[phys]

    def peer_views(self, layer: int, phys: int) -> tuple[ExpertWeight, ExpertWeight, ExpertWeight]:
        return self.views(layer, phys)  # every rank's slots are in this process

    def holds(self, layer: int, phys: int) -> int:
        return int(self.placement.phys_to_logical[0, phys]) if self.serves(layer, phys) else NO_EXPERT

    def mark(self, layer: int, phys: int, expert: int) -> None:
        pass  # the maps say what a slot holds once switched; until then ``holds`` says nothing new

    def serves(self, layer: int, phys: int) -> bool:
        return (int(self.placement.phys_to_logical[0, phys]) != NO_EXPERT
                and self.membership.is_active(phys // self.slots_per_rank))

    def poison(self, layer: int, phys: int) -> None:
        for w in self.views(layer, phys):
            w.fill_(float("nan"))

    def switch(self, placement: ExpertPlacement, membership: Membership) -> None:
        s = self.slots_per_rank
        for rank in range(self.num_ranks):
            if not membership.is_active(rank):
                self.poison_slots(range(rank * s, (rank + 1) * s))
        self.membership.copy_from(membership)
        self.placement.copy_(placement)


class SlotStore(Protocol):
    """Per-slot expert weights that repair plans write: what ``SlotExecutor`` needs of them.

    Slots are named by placement layer and physical slot (``rank * slots_per_rank + i``). One store
    may hold every rank's slots (``ExpertSlots``, simulated ranks in one process) or one rank's
    (the runtime's ``eep.runtime.engines.slots.RankSlots``, whose peers' slots are mapped from
    other processes or GPUs).

    - ``views(layer, phys)``: the destination tensors of one of this store's slots,
      ``(w_gate [I, H], w_up [I, H], w_down [H, I])`` (``Fp8Weight`` units for FP8 experts);
    - ``peer_views(layer, phys)``: the same of a live replica to copy from (raises naming the peer
      when it cannot be read);
    - ``holds(layer, phys)``: the expert a slot's bytes are known to hold (``NO_EXPERT`` if none);
      ``mark`` records it after a write;
    - ``serves(layer, phys)``: whether the routing in force reads the slot (it must not be written);
    - ``poison(layer, phys)``: NaN into a slot that must never be read again;
    - ``switch(placement, membership)``: the new maps take effect (the in-place table writes);
    - ``copy_stream``: the CUDA stream copies are enqueued on (off the compute stream), or None.
    """

    slots_per_rank: int
    copy_stream: "torch.cuda.Stream | None"

    def views(self, layer: int, phys: int) -> tuple[ExpertWeight, ExpertWeight, ExpertWeight]: ...

    def peer_views(self, layer: int, phys: int) -> tuple[ExpertWeight, ExpertWeight, ExpertWeight]: ...

    def holds(self, layer: int, phys: int) -> int: ...

    def mark(self, layer: int, phys: int, expert: int) -> None: ...

    def serves(self, layer: int, phys: int) -> bool: ...

    def poison(self, layer: int, phys: int) -> None: ...

    def switch(self, placement: ExpertPlacement, membership: Membership) -> None: ...


class OneRankSlots:
    """The bookkeeping of a ``SlotStore`` that holds one rank's slots (the runtime's ``RankSlots``, the
    SGLang plugin's ``SGLangExpertSlots``): what each slot's bytes hold (``loaded [layers, slots]``,
    ``NO_EXPERT`` when nothing is known), whether the maps in force read a slot, and the switch's
    refusal of maps that name an expert a slot does not hold. Subclasses set ``rank``,
    ``slots_per_rank``, ``loaded``, ``placement`` (None: no maps yet) and ``active``, and give ``views``."""

    rank: int
    slots_per_rank: int
    loaded: torch.Tensor
    placement: ExpertPlacement | None
    active: list[bool]

    def _local(self, phys: int) -> int:
        if phys // self.slots_per_rank != self.rank:
            raise RepairError(f"rank {self.rank}: slot {phys} is on rank {phys // self.slots_per_rank}, not this rank")
        return phys % self.slots_per_rank

    def layer_name(self, layer: int) -> int:
        """How messages name a placement layer (a serving stack's own layer id, where it has one)."""
        return layer

    def holds(self, layer: int, phys: int) -> int:
        rank, i = divmod(phys, self.slots_per_rank)
        return int(self.loaded[layer, i]) if rank == self.rank else NO_EXPERT

    def mark(self, layer: int, phys: int, expert: int) -> None:
        self.loaded[layer, self._local(phys)] = expert

    def serves(self, layer: int, phys: int) -> bool:
        return (self.placement is not None and self.active[self.rank]
                and int(self.placement.phys_to_logical[layer, phys]) != NO_EXPERT)

    def poison(self, layer: int, phys: int) -> None:
        for w in self.views(layer, phys):
            w.fill_(float("nan"))
        self.mark(layer, phys, NO_EXPERT)

    def check_holds(self, placement: ExpertPlacement) -> None:
        """``RepairError`` unless every slot of this rank that ``placement`` names holds that expert."""
        S = self.slots_per_rank
        want = placement.phys_to_logical[:, self.rank * S:(self.rank + 1) * S]
        wrong = ((want != NO_EXPERT) & (want != self.loaded)).nonzero().tolist()
        if wrong:  # never serve maps that name an expert this rank's slot does not hold
            layer, i = wrong[0]
            raise RepairError(f"rank {self.rank}: the maps put expert {int(want[layer, i])} in layer "
                              f"{self.layer_name(layer)} slot {i}, which holds {int(self.loaded[layer, i])} "
                              f"({len(wrong)} such slots)")


class SlotExecutor(RepairExecutor):
    """The one executor of repair, reintegration and re-replication plans, over any ``SlotStore``;
    commits ``new_membership`` together with the maps.

    A slot that serves nothing right now (spare, or on a rank outside the current routing) is
    written directly: no route reads it until the map switch. A slot that still serves (a donor
    replica) is staged in a side buffer and overwritten only by ``commit``. So a corrupt shard or a
    missing expert half-way leaves every serving slot and the maps exactly as they were. A transfer
    whose destination already holds its expert (``SlotStore.holds``) is not copied again.

    A peer source must be on a rank active in ``new_membership`` and, when ``is_source`` is given,
    one it accepts (the runtime: a member whose own copies for the maps in force are done). With a
    ``copy_stream`` every copy is enqueued on it, the transfers of one layer form a batch timed by
    two CUDA events, and ``commit`` waits for the last one before it switches the maps.

    ``before_commit``, when given, runs first in ``commit``, before any serving slot or map is
    written: where ranks in other processes execute their parts of one plan, it is their vote (raise
    to abort: the executor then discards, and every serving slot and map stays as it was).
    """

    def __init__(self, store: SlotStore, new_membership: Membership, tiers: Sequence[ExpertSource], *,
                 is_source: Callable[[int], bool] | None = None, before_commit: Callable[[], None] | None = None):
        self.store = store
        self.before_commit = before_commit
        self.new_membership = new_membership
        self.epoch = new_membership.epoch
        self.tiers = list(tiers)
        self.is_source = is_source
        self.staged: dict[tuple[int, int], tuple[tuple[ExpertWeight, ExpertWeight, ExpertWeight], int]] = {}
        self.written_in_place: list[tuple[int, int]] = []
        self.stream = store.copy_stream
        self._batches: list[dict] = []  # {"layer", "transfers", "start", "end"}: events or perf_counter times
        if self.stream is not None:  # after what the compute stream did to the slots (their NaN fill, last step)
            self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))

    def holds(self, transfer: Transfer) -> bool:
        key = (transfer.layer, transfer.dst_slot)
        return key not in self.staged and self.store.holds(*key) == transfer.logical_expert_id

    def stage(self, transfer: Transfer, tier: ExpertSource | None) -> float:
        store = self.store
        start = time.perf_counter()
        self._enter_batch(transfer.layer)
        key = (transfer.layer, transfer.dst_slot)
        with _on(self.stream):
            if store.serves(*key):
                weights = tuple(empty_like_weight(v) for v in store.views(*key))
                self.staged[key] = (weights, transfer.logical_expert_id)
            else:
                weights = store.views(*key)
                store.mark(*key, NO_EXPERT)  # untrusted until the copy is done
                if key not in self.written_in_place:
                    self.written_in_place.append(key)
            if tier is None:  # peer replica: read the live source slot
                src = transfer.source_slot
                src_rank = None if src is None else src // store.slots_per_rank
                if src is None or not self.new_membership.is_active(src_rank) or \
                        (self.is_source is not None and not self.is_source(src_rank)):
                    raise RepairError(f"peer source slot {src} (rank {src_rank}) is not a live replica to copy from")
                for w, source in zip(weights, store.peer_views(transfer.layer, src)):
                    w.copy_(source, non_blocking=self.stream is not None)
            else:
                tier.copy_expert_into(transfer.checkpoint_layer, transfer.logical_expert_id, *weights,
                                      stream=self.stream)
        if key not in self.staged:
            store.mark(*key, transfer.logical_expert_id)
        self._batches[-1]["transfers"] += 1
        return time.perf_counter() - start

    def commit(self, placement: ExpertPlacement, epoch: int) -> None:
        store = self.store
        if self.before_commit is not None:
            self.before_commit()
        with _on(self.stream):
            for key, (weights, expert) in self.staged.items():
                for dst, w in zip(store.views(*key), weights):
                    dst.copy_(w, non_blocking=self.stream is not None)
                store.mark(*key, expert)
        self.wait()
        self.staged.clear()
        self.written_in_place.clear()
        store.switch(placement, self.new_membership)

    def wait(self) -> None:
        """Until every copy enqueued so far is done (the commit's wait on the last batch's event)."""
        self._close_batch()
        if self.stream is not None:
            self.stream.synchronize()

    def is_done(self) -> bool:
        """Whether every copy enqueued so far has finished (never blocks)."""
        self._close_batch()
        return self.stream is None or all(b["end"].query() for b in self._batches)

    def discard(self) -> None:
        self.staged.clear()
        with _on(self.stream):
            for key in self.written_in_place:  # they served nothing before; make sure of it
                self.store.poison(*key)
        self.written_in_place.clear()

    def batch_times(self) -> list[dict]:
        self._close_batch()
        out = []
        for b in self._batches:
            if self.stream is not None:
                seconds = b["start"].elapsed_time(b["end"]) / 1e3  # the copy stream's own time
            else:
                seconds = b["end"] - b["start"]
            out.append({"layer": b["layer"], "transfers": b["transfers"], "seconds": seconds})
        return out

    def _enter_batch(self, layer: int) -> None:
        if self._batches and self._batches[-1]["layer"] == layer and self._batches[-1]["end"] is None:
            return
        self._close_batch()
        self._batches.append({"layer": layer, "transfers": 0, "start": self._mark(), "end": None})

    def _close_batch(self) -> None:
        if self._batches and self._batches[-1]["end"] is None:
            self._batches[-1]["end"] = self._mark()

    def _mark(self):
        if self.stream is None:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(self.stream)
        return event


@contextlib.contextmanager
def _on(stream):
    """Enqueue on ``stream`` (a CUDA stream), or run as is (None)."""
    if stream is None:
        yield
    else:
        with torch.cuda.stream(stream):
            yield


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
