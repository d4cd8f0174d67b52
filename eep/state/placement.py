"""Expert placement: which logical expert each physical slot holds, per MoE layer.

Glossary (the convention SGLang, vLLM and DeepSeek EPLB share, so their users recognise it):

- logical expert ``e``: expert ``e`` of layer ``l`` in the checkpoint, ``0..num_experts-1``.
- physical slot ``p``: one expert-sized weight buffer on one rank, ``p = rank * slots_per_rank + i``.
  ``num_phys_slots = num_ranks * slots_per_rank``.
- replica: a physical slot holding a logical expert. An expert has at most one replica per rank
  (a second copy on the same rank adds no capacity and no fault tolerance), so
  ``max_replicas = num_ranks`` and the routing table never needs to grow.

Worked example: 16 experts on 4 ranks with 5 slots each gives 20 physical slots; 4 of them hold
redundant replicas of 4 experts (the heaviest, when a load is given), so those 4 experts survive
the loss of any one rank without a single byte moving.

``phys_to_logical`` is the single source of truth; ``logical_to_phys`` and ``replica_count`` are
derived from it, so the three can never disagree.
"""

from __future__ import annotations

import heapq
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from eep.errors import PlacementError

NO_EXPERT = -1  # an empty physical slot in phys_to_logical; padding in logical_to_phys
PLACEMENT_FORMAT = "eep.placement/1"


@dataclass
class ExpertPlacement:
    """Per-layer maps between logical experts and physical slots.

    Fields:
        phys_to_logical: ``[num_layers, num_phys_slots]`` int64, ``NO_EXPERT`` for an empty slot.
            Example, 1 layer, 2 ranks x 3 slots, 4 experts: ``[[0, 2, 1,  1, 3, 0]]``.
        logical_to_phys: ``[num_layers, num_experts, max_replicas]`` int64, the slots of each
            expert in ascending order, ``NO_EXPERT`` padded. Same example: ``[[[0, 5], [2, 3],
            [1, -1], [4, -1]]]``.
        replica_count: ``[num_layers, num_experts]`` int64, the number of valid entries per row
            of ``logical_to_phys``. Same example: ``[[2, 2, 1, 1]]``.
    """

    num_ranks: int
    slots_per_rank: int
    num_experts: int
    phys_to_logical: torch.Tensor
    logical_to_phys: torch.Tensor
    replica_count: torch.Tensor

    # ---- construction ----
    @classmethod
    def from_phys_to_logical(cls, phys_to_logical: torch.Tensor, *, num_ranks: int, slots_per_rank: int,
                             num_experts: int) -> "ExpertPlacement":
        """Validate ``phys_to_logical`` ``[num_layers, num_phys_slots]`` and derive the other maps."""
        p2l = torch.as_tensor(phys_to_logical).to(torch.int64).cpu()
        _check_phys_to_logical(p2l, num_ranks, slots_per_rank, num_experts)
        l2p, counts = _derive_logical_to_phys(p2l, num_ranks, num_experts)
        return cls(num_ranks, slots_per_rank, num_experts, p2l.clone(), l2p, counts)

    @classmethod
    def build(cls, num_layers: int, num_experts: int, num_ranks: int, slots_per_rank: int,
              load: torch.Tensor | None = None, *, num_redundant: int | None = None,
              ranks_per_node: int = 0) -> "ExpertPlacement":
        """Balanced placement with redundant replicas, such that the heaviest rank load is small.

        Parameters:
            load: ``[num_layers, num_experts]`` (or ``[num_experts]``, shared by all layers)
                non-negative token counts; ``None`` means uniform.
            num_redundant: replicas beyond one per expert, per layer. ``None`` fills every spare
                slot (``num_phys_slots - num_experts``); a smaller number leaves spare slots empty,
                which coverage repair then uses before taking donor slots.
            ranks_per_node: when set, replicas of one expert go to different nodes first, so
                that losing a whole node orphans as few experts as possible.

        Steps: (1) give every expert one replica and hand the redundant ones, one at a time, to
        the expert with the highest load per replica (ties: lowest id), at most one per rank;
        (2) pack replicas onto ranks, most-replicated and heaviest first, each onto the
        least-loaded rank that has a free slot and no copy of that expert yet (preferring a node
        with no copy either, when ``ranks_per_node`` is given).
        """
        num_phys_slots = num_ranks * slots_per_rank
        if min(num_layers, num_experts, num_ranks, slots_per_rank) < 1:
            raise PlacementError(
                f"num_layers={num_layers}, num_experts={num_experts}, num_ranks={num_ranks}, "
                f"slots_per_rank={slots_per_rank}: all must be >= 1")
        if num_phys_slots < num_experts:
            raise PlacementError(
                f"{num_experts} experts do not fit in {num_ranks} ranks x {slots_per_rank} slots "
                f"= {num_phys_slots} physical slots")
        spare = num_phys_slots - num_experts
        num_redundant = spare if num_redundant is None else num_redundant
        if not 0 <= num_redundant <= spare:
            raise PlacementError(f"num_redundant={num_redundant} must be in [0, {spare}] (the spare slots)")
        load = _normalise_load(load, num_layers, num_experts)

        p2l = torch.full((num_layers, num_phys_slots), NO_EXPERT, dtype=torch.int64)
        for layer in range(num_layers):
            counts = _replicate(load[layer], num_redundant, num_ranks)
            p2l[layer] = _pack(load[layer], counts, num_ranks, slots_per_rank, layer, ranks_per_node)
        return cls.from_phys_to_logical(p2l, num_ranks=num_ranks, slots_per_rank=slots_per_rank,
                                        num_experts=num_experts)

    # ---- sizes ----
    @property
    def num_layers(self) -> int:
        return self.phys_to_logical.shape[0]

    @property
    def num_phys_slots(self) -> int:
        return self.num_ranks * self.slots_per_rank

    @property
    def max_replicas(self) -> int:
        return self.num_ranks

    # ---- index helpers ----
    def rank_of(self, phys_slot: int) -> int:
        return phys_slot // self.slots_per_rank

    def phys_slot(self, rank: int, local_slot: int) -> int:
        return rank * self.slots_per_rank + local_slot

    def replicas(self, layer: int, logical_expert_id: int) -> list[int]:
        """Physical slots holding ``logical_expert_id`` in ``layer``, ascending."""
        n = int(self.replica_count[layer, logical_expert_id])
        return self.logical_to_phys[layer, logical_expert_id, :n].tolist()

    def experts_on_rank(self, layer: int, rank: int) -> list[int]:
        s = self.slots_per_rank
        return [e for e in self.phys_to_logical[layer, rank * s:(rank + 1) * s].tolist() if e != NO_EXPERT]

    # ---- mutation ----
    def copy_(self, other: "ExpertPlacement") -> None:
        """Adopt ``other``'s maps by writing this object's tensors in place.

        Routing tables captured in a CUDA graph keep their storage, so a placement change is a
        table write, not a recapture. All checks happen before the first write.
        """
        if (other.num_ranks, other.slots_per_rank, other.num_experts, other.num_layers) != \
                (self.num_ranks, self.slots_per_rank, self.num_experts, self.num_layers):
            raise PlacementError(
                "cannot copy a placement of a different size in place: "
                f"(ranks, slots_per_rank, experts, layers) {self._dims()} <- {other._dims()}")
        self.phys_to_logical.copy_(other.phys_to_logical)
        self.logical_to_phys.copy_(other.logical_to_phys)
        self.replica_count.copy_(other.replica_count)

    def clone(self) -> "ExpertPlacement":
        return ExpertPlacement(self.num_ranks, self.slots_per_rank, self.num_experts,
                               self.phys_to_logical.clone(), self.logical_to_phys.clone(),
                               self.replica_count.clone())

    def to(self, device: torch.device | str) -> "ExpertPlacement":
        """A copy whose tensors live on ``device`` (e.g. routing tables for kernels)."""
        return ExpertPlacement(self.num_ranks, self.slots_per_rank, self.num_experts,
                               self.phys_to_logical.to(device), self.logical_to_phys.to(device),
                               self.replica_count.to(device))

    def equal(self, other: "ExpertPlacement") -> bool:
        return self._dims() == other._dims() and torch.equal(self.phys_to_logical.cpu(), other.phys_to_logical.cpu())

    # ---- serialisation ----
    def to_dict(self) -> dict:
        return {"format": PLACEMENT_FORMAT, "num_ranks": self.num_ranks, "slots_per_rank": self.slots_per_rank,
                "num_experts": self.num_experts, "phys_to_logical": self.phys_to_logical.tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> "ExpertPlacement":
        if data.get("format") != PLACEMENT_FORMAT:
            raise PlacementError(f"placement format {data.get('format')!r} is not {PLACEMENT_FORMAT!r}")
        try:
            p2l = torch.tensor(data["phys_to_logical"], dtype=torch.int64)
            dims = int(data["num_ranks"]), int(data["slots_per_rank"]), int(data["num_experts"])
        except (KeyError, TypeError, ValueError) as exc:
            raise PlacementError(f"malformed placement: {exc}") from exc
        return cls.from_phys_to_logical(p2l, num_ranks=dims[0], slots_per_rank=dims[1], num_experts=dims[2])

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict()))
        os.replace(tmp, path)  # atomic: a reader never sees half a placement

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ExpertPlacement":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise PlacementError(f"cannot read placement {path}: {exc}") from exc
        try:
            return cls.from_dict(data)
        except PlacementError as exc:
            raise PlacementError(f"{path}: {exc}") from exc

    def _dims(self) -> tuple[int, int, int, int]:
        return self.num_ranks, self.slots_per_rank, self.num_experts, self.num_layers

    def __repr__(self) -> str:
        return (f"ExpertPlacement(num_layers={self.num_layers}, num_experts={self.num_experts}, "
                f"num_ranks={self.num_ranks}, slots_per_rank={self.slots_per_rank})")


def _check_phys_to_logical(p2l: torch.Tensor, num_ranks: int, slots_per_rank: int, num_experts: int) -> None:
    if p2l.dim() != 2 or p2l.shape[1] != num_ranks * slots_per_rank:
        raise PlacementError(
            f"phys_to_logical has shape {tuple(p2l.shape)}, expected [num_layers, {num_ranks * slots_per_rank}] "
            f"for {num_ranks} ranks x {slots_per_rank} slots")
    bad = (p2l < NO_EXPERT) | (p2l >= num_experts)
    if bool(bad.any()):
        layer, slot = (int(i) for i in bad.nonzero()[0])
        raise PlacementError(
            f"phys_to_logical[{layer}, {slot}] = {int(p2l[layer, slot])} is not an expert id in "
            f"[0, {num_experts}) nor NO_EXPERT={NO_EXPERT}")
    # An expert twice on one rank shows up as two equal neighbours once each rank's slots are sorted.
    per_rank = p2l.view(p2l.shape[0], num_ranks, slots_per_rank).sort(dim=-1).values
    dup = (per_rank[..., 1:] == per_rank[..., :-1]) & (per_rank[..., 1:] != NO_EXPERT)
    if bool(dup.any()):
        layer, rank, i = (int(v) for v in dup.nonzero()[0])
        raise PlacementError(f"layer {layer}: rank {rank} holds expert {int(per_rank[layer, rank, i])} "
                             f"in more than one slot")


def _derive_logical_to_phys(p2l: torch.Tensor, num_ranks: int, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    num_layers, num_phys = p2l.shape
    key = torch.where(p2l == NO_EXPERT, num_experts, p2l)  # empty slots sort last, into a dropped bucket
    counts_ext = torch.zeros(num_layers, num_experts + 1, dtype=torch.int64).scatter_add_(1, key, torch.ones_like(key))
    # Sort each layer's slots by (expert, phys): replicas of an expert become a run in ascending phys order.
    order = torch.argsort(key * num_phys + torch.arange(num_phys), dim=1)
    sorted_expert = key.gather(1, order)
    run_start = counts_ext.cumsum(1) - counts_ext  # [L, E+1] first sorted index of each expert's run
    position = torch.arange(num_phys).expand(num_layers, -1) - run_start.gather(1, sorted_expert)
    layer_idx, sorted_idx = (sorted_expert < num_experts).nonzero(as_tuple=True)  # one pass over the mask
    l2p = torch.full((num_layers, num_experts, num_ranks), NO_EXPERT, dtype=torch.int64)
    l2p[layer_idx, sorted_expert[layer_idx, sorted_idx], position[layer_idx, sorted_idx]] = order[layer_idx, sorted_idx]
    return l2p, counts_ext[:, :num_experts].contiguous()


def _normalise_load(load: torch.Tensor | None, num_layers: int, num_experts: int) -> torch.Tensor:
    if load is None:
        return torch.ones(num_layers, num_experts, dtype=torch.float64)
    load = torch.as_tensor(load).to(torch.float64).cpu()
    if load.dim() == 1:
        load = load.expand(num_layers, -1)
    if tuple(load.shape) != (num_layers, num_experts):
        raise PlacementError(f"load has shape {tuple(load.shape)}, expected [{num_layers}, {num_experts}] "
                             f"or [{num_experts}]")
    if bool((load < 0).any()) or not bool(torch.isfinite(load).all()):
        raise PlacementError("load must be finite and non-negative")
    return load


def _replicate(load: torch.Tensor, num_redundant: int, num_ranks: int) -> list[int]:
    """Replica count per expert: one each, plus redundant ones to the highest load-per-replica."""
    counts = [1] * load.shape[0]
    chooser = ReplicaChooser(load.tolist(), counts)  # updates ``counts`` as it hands experts out
    capped = {e for e, c in enumerate(counts) if c >= num_ranks}  # at most one replica per rank
    for _ in range(num_redundant):
        expert = chooser.take(capped)
        if expert is None:
            break
        if counts[expert] >= num_ranks:
            capped.add(expert)
    return counts


_NEG_INF = float("-inf")


class ReplicaChooser:
    """Hands out experts by highest load per live replica (ties: lowest id); no replicas ranks first.

    One heap entry per expert, re-keyed after every pick, so each pick costs O(log num_experts).
    """

    def __init__(self, load_row: list[float], counts: list[int]):
        self.load_row = load_row
        self.counts = counts
        self.heap = [(-(load / c) if c else _NEG_INF, e) for e, (load, c) in enumerate(zip(load_row, counts))]
        heapq.heapify(self.heap)

    def _key(self, expert: int) -> float:
        c = self.counts[expert]
        return -(self.load_row[expert] / c) if c else _NEG_INF

    def take(self, excluded: set[int]) -> int | None:
        skipped = []
        chosen = None
        while self.heap:
            entry = heapq.heappop(self.heap)
            if entry[1] in excluded:
                skipped.append(entry)
                continue
            chosen = entry[1]
            self.counts[chosen] += 1
            heapq.heappush(self.heap, (self._key(chosen), chosen))
            break
        for entry in skipped:
            heapq.heappush(self.heap, entry)
        return chosen


def _pack(load: torch.Tensor, counts: list[int], num_ranks: int, slots_per_rank: int, layer: int,
          ranks_per_node: int = 0) -> torch.Tensor:
    """Assign replicas to rank slots; returns one layer of phys_to_logical."""
    loads = load.tolist()
    rank_load = [0.0] * num_ranks
    rank_experts: list[list[int]] = [[] for _ in range(num_ranks)]
    # Most-replicated first: they need that many distinct ranks, easiest while slots are free.
    order = sorted(range(len(counts)), key=lambda e: (-counts[e], -loads[e] / counts[e], e))
    node_of = [r // ranks_per_node if ranks_per_node else r for r in range(num_ranks)]
    for expert in order:
        share = loads[expert] / counts[expert]
        nodes_holding: set[int] = set()
        for _ in range(counts[expert]):
            eligible = [r for r in range(num_ranks)
                        if len(rank_experts[r]) < slots_per_rank and expert not in rank_experts[r]]
            if not eligible:
                raise PlacementError(f"layer {layer}: cannot place another replica of expert {expert} "
                                     f"on a rank that does not already hold it")
            rank = min(eligible, key=lambda r: (node_of[r] in nodes_holding, rank_load[r], len(rank_experts[r]), r))
            nodes_holding.add(node_of[rank])
            rank_experts[rank].append(expert)
            rank_load[rank] += share
    row = torch.full((num_ranks * slots_per_rank,), NO_EXPERT, dtype=torch.int64)
    for rank, experts in enumerate(rank_experts):
        row[rank * slots_per_rank: rank * slots_per_rank + len(experts)] = torch.tensor(experts, dtype=torch.int64)
    return row


def default_slots_per_rank(num_experts: int, num_ranks: int) -> int:
    """Slots per rank such that any two ranks may die together and the rest still hold every
    expert, ``ceil(E / (N - 2))``; at 2 or 3 ranks, where one survivor may be all that is left, E.
    Every rank count from 2 up therefore repairs a failure in place."""
    if num_ranks < 2:
        return num_experts
    return math.ceil(num_experts / max(1, num_ranks - 2))


def default_num_redundant(num_experts: int, num_ranks: int, slots_per_rank: int) -> int:
    """Redundant replicas per layer: half the slots beyond one replica per expert, at most one per
    two experts (a failed rank's experts then often live elsewhere already); the other half stay
    empty, landing room for orphans."""
    spare = num_ranks * slots_per_rank - num_experts
    return max(0, min(num_experts // 2, spare // 2))
