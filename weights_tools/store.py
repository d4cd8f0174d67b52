"""``ExpertStore``: restore one logical expert from the fastest tier that holds a good copy.

Tiers are tried in order (fastest first, e.g. ``[HostTier, DiskTier]``). A tier that fails (corrupt
shard, stale host copy) is logged and recorded, and the next tier serves; only when every tier
has failed does the call raise ``ExpertUnavailableError`` listing each tier's reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from eep.repair.tiers import ExpertSource
from weights_tools.errors import ExpertUnavailableError, ShardError
from weights_tools.manifest import Manifest
from weights_tools.safetensors_io import DTYPE_TO_TORCH
from weights_tools.tiers import DiskTier, tier_from_name

log = logging.getLogger("weights_tools")


@dataclass(frozen=True)
class RestoreRecord:
    """One attempt to restore one expert from one tier.

    ``seconds`` is host wall time; for copies enqueued on a CUDA ``stream`` it ends at enqueue.
    ``error`` is ``None`` when the tier served the expert, else why it could not.
    """

    tier: str
    layer: int
    expert: int
    nbytes: int
    seconds: float
    error: str | None = None

    @property
    def is_ok(self) -> bool:
        return self.error is None


class ExpertStore:
    """Tiered access to the experts of one shard directory (see ``eep-shards prepare``).

    ``tiers``: ``eep.repair.ExpertSource`` objects (``HostTier``, ``DiskTier``) or the names
    ``"host"``/``"disk"``, fastest first; default ``["disk"]``.
    ``records`` keeps every attempt, successful or not, in order.
    """

    def __init__(self, shard_dir: str, *, tiers: Sequence[ExpertSource | str] | None = None):
        self.shard_dir = shard_dir
        self.manifest = Manifest.load(shard_dir)
        self.tiers: list[ExpertSource] = [tier_from_name(t, shard_dir, self.manifest) if isinstance(t, str) else t
                                  for t in (tiers if tiers is not None else ["disk"])]
        if not self.tiers:
            raise ValueError("ExpertStore needs at least one tier")
        self.records: list[RestoreRecord] = []

    # ---- sizes ----
    @property
    def moe_layers(self) -> list[int]:
        return self.manifest.moe_layers

    @property
    def num_experts(self) -> int:
        return self.manifest.num_experts

    @property
    def dtype(self) -> torch.dtype:
        return DTYPE_TO_TORCH[self.manifest.architecture["dtype"]]

    def expert_shapes(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """``([I, H], [I, H], [H, I])``: the shapes of ``w_gate``, ``w_up``, ``w_down``."""
        inter, hidden = self.manifest.intermediate_size, self.manifest.hidden_size
        return (inter, hidden), (inter, hidden), (hidden, inter)

    # ---- restore ----
    def load_expert(self, layer: int, expert: int, *, device: torch.device | str = "cpu"
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fresh ``(w_gate [I, H], w_up [I, H], w_down [H, I])`` of one logical expert."""
        dsts = tuple(torch.empty(s, dtype=self.dtype, device=device) for s in self.expert_shapes())
        self.load_expert_into(layer, expert, *dsts)
        return dsts  # type: ignore[return-value]

    def load_expert_into(self, layer: int, expert: int, w_gate_dst: torch.Tensor, w_up_dst: torch.Tensor,
                         w_down_dst: torch.Tensor, *, stream: torch.cuda.Stream | None = None) -> RestoreRecord:
        """Copy one expert into the given tensors (any device) from the first tier that serves it.

        Raises ``ValueError`` for an unknown (layer, expert) or destinations of the wrong shape or
        dtype (a caller bug: no tier is tried), ``ExpertUnavailableError`` when every tier failed.
        """
        self.manifest.expert_entries(layer, expert)  # ValueError naming the valid ranges
        for name, dst, shape in zip(("w_gate_dst", "w_up_dst", "w_down_dst"), (w_gate_dst, w_up_dst, w_down_dst),
                                    self.expert_shapes()):
            if tuple(dst.shape) != shape or dst.dtype != self.dtype:
                raise ValueError(f"{name} is {list(dst.shape)} {dst.dtype}; layer {layer} expert {expert} is "
                                 f"{list(shape)} {self.dtype}")
        failures: list[tuple[str, str]] = []
        for tier in self.tiers:
            if not tier.has_expert(layer, expert):
                continue
            start = time.perf_counter()
            try:
                nbytes = tier.copy_expert_into(layer, expert, w_gate_dst, w_up_dst, w_down_dst, stream=stream)
            except (ShardError, OSError) as exc:
                record = RestoreRecord(tier.name, layer, expert, 0, time.perf_counter() - start, error=str(exc))
                self.records.append(record)
                failures.append((tier.name, str(exc)))
                log.warning("restore of layer %d expert %d from the %s tier failed, trying the next tier: %s",
                            layer, expert, tier.name, exc)
                continue
            record = RestoreRecord(tier.name, layer, expert, nbytes, time.perf_counter() - start)
            self.records.append(record)
            return record
        raise ExpertUnavailableError(layer, expert, failures)

    def close(self) -> None:
        for tier in self.tiers:
            close = getattr(tier, "close", None)
            if close is not None:
                close()


def load_layer_experts(shard_dir: str, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All experts of one MoE layer, stacked: ``(w_gate [E, I, H], w_up [E, I, H], w_down [E, H, I])``.

    The layout ``eep.reference.ExpertParallelMoE`` and ``dense_moe`` take; read from disk, verified.
    """
    store = ExpertStore(shard_dir, tiers=[DiskTier(shard_dir)])
    if layer not in store.moe_layers:
        raise ValueError(f"layer {layer} is not an MoE layer of {shard_dir}: MoE layers are {store.moe_layers}")
    num_experts = store.num_experts
    gate_shape, up_shape, down_shape = store.expert_shapes()
    w_gate = torch.empty(num_experts, *gate_shape, dtype=store.dtype)
    w_up = torch.empty(num_experts, *up_shape, dtype=store.dtype)
    w_down = torch.empty(num_experts, *down_shape, dtype=store.dtype)
    for expert in range(num_experts):
        store.load_expert_into(layer, expert, w_gate[expert], w_up[expert], w_down[expert])
    store.close()
    return w_gate, w_up, w_down
