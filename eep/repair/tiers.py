"""Where a lost expert's weights can come from, fastest first: peer GPU replica, host memory, disk.

``ExpertSource`` is the one protocol for a source of expert weights. The planner asks only
``name`` and ``has_expert`` (and ``expert_nbytes`` when it sizes transfers); executors also call
``copy_expert_into``. Its implementations:

- ``weights_tools.HostTier`` (one shared host-memory file per node) and ``weights_tools.DiskTier``
  (the per-expert safetensors shards), for the real thing;
- ``TensorTier``: tensors already in memory (the reference layer's stand-in for a host copy, and
  the runtime's generated tiny model);
- ``DeclaredTier``: a tier known by name only, for a planner whose ranks hold the bytes in other
  processes (the runtime's coordinator plans every commit with it; each rank copies from its own
  tier of that name).

A surviving replica on a peer GPU is not a tier object: it is a live slot, named in a transfer by
its rank and slot, and copied by the executor that can reach it.

Block-scaled FP8 experts travel as ``eep.fp8.Fp8Weight`` units (weights and scales together), and
their size counts both.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from eep.fp8 import ExpertWeight, weight_nbytes

PEER, HOST, DISK = "peer", "host", "disk"
TIER_RANK = {PEER: 0, HOST: 1, DISK: 2}  # fastest first; unknown tier names sort after disk


@runtime_checkable
class ExpertSource(Protocol):
    """A tier that can serve experts' weights into destination tensors.

    ``copy_expert_into`` copies all three tensors of one expert (``w_gate [I, H]``, ``w_up [I, H]``,
    ``w_down [H, I]``) and returns the bytes copied, or raises naming what is at fault (file,
    tensor, layer, expert): it never reports success for a bad copy. With ``stream`` and GPU
    destinations the copies are enqueued on that stream and may still be in flight on return.
    """

    name: str  # "host", "disk", ... (PEER is reserved for live replicas)

    def has_expert(self, layer: int, expert: int) -> bool: ...

    def copy_expert_into(self, layer: int, expert: int, w_gate_dst: ExpertWeight, w_up_dst: ExpertWeight,
                         w_down_dst: ExpertWeight, *, stream=None) -> int: ...


def tier_order(tiers: list) -> list:
    """Tiers sorted fastest first (stable for equal names)."""
    return sorted(tiers, key=lambda t: TIER_RANK.get(t.name, len(TIER_RANK)))


class TensorTier:
    """A host-memory tier over stacked per-layer weights ``{layer: (w_gate[E,I,H], w_up[E,I,H], w_down[E,H,I])}``
    (tensors, or ``Fp8Weight`` stacks)."""

    def __init__(self, weights_by_layer: dict[int, tuple[ExpertWeight, ExpertWeight, ExpertWeight]], *,
                 name: str = HOST):
        self.name = name
        self.weights_by_layer = weights_by_layer

    def has_expert(self, layer: int, expert: int) -> bool:
        weights = self.weights_by_layer.get(layer)
        return weights is not None and 0 <= expert < weights[0].shape[0]

    def expert_nbytes(self, layer: int, expert: int) -> int:
        return sum(weight_nbytes(w[expert]) for w in self.weights_by_layer[layer])

    def copy_expert_into(self, layer: int, expert: int, w_gate_dst: ExpertWeight, w_up_dst: ExpertWeight,
                         w_down_dst: ExpertWeight, *, stream=None) -> int:
        if not self.has_expert(layer, expert):
            raise KeyError(f"{self.name} tier holds no layer {layer} expert {expert}")
        for dst, src in zip((w_gate_dst, w_up_dst, w_down_dst), self.weights_by_layer[layer]):
            dst.copy_(src[expert], non_blocking=stream is not None)
        return self.expert_nbytes(layer, expert)


class DeclaredTier:
    """A tier as a planner in another process knows it: a name, and which experts it holds.

    Every rank of the runtime opens its own tier of this name (the node's host tier, the shard
    directory); the coordinator only needs to know that it exists and what it holds, so that the
    plan it publishes names the same source every rank's recomputation names. ``experts=None``
    means every expert of every layer. It holds no bytes: executors copy from the real tier.
    """

    def __init__(self, name: str, experts: Iterable[tuple[int, int]] | None = None):
        self.name = name
        self.experts = None if experts is None else frozenset((int(l), int(e)) for l, e in experts)

    def has_expert(self, layer: int, expert: int) -> bool:
        return self.experts is None or (layer, expert) in self.experts

    def __repr__(self) -> str:
        held = "every expert" if self.experts is None else f"{len(self.experts)} experts"
        return f"DeclaredTier({self.name!r}, {held})"
