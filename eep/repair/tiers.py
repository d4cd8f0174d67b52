"""Where a lost expert's weights can come from, fastest first: peer GPU replica, host memory, disk.

The planner and executors talk to tiers through ``ExpertSource``; ``weights_tools.HostTier`` and
``weights_tools.DiskTier`` implement it, and ``TensorTier`` wraps tensors already in memory (the
reference layer's stand-in for a host copy). Block-scaled FP8 experts travel as ``eep.fp8.Fp8Weight``
units (weights and scales together), and their size counts both.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from eep.fp8 import ExpertWeight, weight_nbytes

PEER, HOST, DISK = "peer", "host", "disk"
TIER_RANK = {PEER: 0, HOST: 1, DISK: 2}  # fastest first; unknown tier names sort after disk


@runtime_checkable
class ExpertSource(Protocol):
    """A tier that can serve experts' weights into destination tensors."""

    name: str  # "host" or "disk" (a peer replica is not a tier object: it is a live slot)

    def has_expert(self, layer: int, expert: int) -> bool: ...

    def copy_expert_into(self, layer: int, expert: int, w_gate_dst: ExpertWeight, w_up_dst: ExpertWeight,
                         w_down_dst: ExpertWeight, *, stream=None) -> int: ...


def tier_order(tiers: list[ExpertSource]) -> list[ExpertSource]:
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
