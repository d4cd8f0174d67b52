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

from eep.fp8 import ExpertWeight, Fp8Weight, block_scale_shape
from eep.repair.tiers import ExpertSource
from weights_tools.errors import ExpertUnavailableError, ShardError
from weights_tools.manifest import SCALE, Manifest
from weights_tools.safetensors_io import DTYPE_TO_TORCH
from weights_tools.tiers import DiskTier, destination_tensors, tier_from_name

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
        """dtype of the expert weights (float8_e4m3fn for block-scaled FP8 experts)."""
        return DTYPE_TO_TORCH[self.manifest.architecture["dtype"]]

    @property
    def is_fp8(self) -> bool:
        """Block-scaled FP8 experts: restores move ``eep.fp8.Fp8Weight`` units (weights + scales)."""
        return self.manifest.is_fp8

    def expert_shapes(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """``([I, H], [I, H], [H, I])``: the shapes of ``w_gate``, ``w_up``, ``w_down``."""
        inter, hidden = self.manifest.intermediate_size, self.manifest.hidden_size
        return (inter, hidden), (inter, hidden), (hidden, inter)

    def empty_expert(self, *, device: torch.device | str = "cpu", lead: tuple[int, ...] = ()
                     ) -> tuple[ExpertWeight, ExpertWeight, ExpertWeight]:
        """Uninitialised destinations for one expert (``lead`` prepends dimensions, e.g. ``(E,)``):
        tensors, or ``Fp8Weight`` units with float32 block scales for FP8 experts."""
        out = []
        for shape in self.expert_shapes():
            weight = torch.empty(*lead, *shape, dtype=self.dtype, device=device)
            out.append(Fp8Weight(weight, torch.empty(*lead, *block_scale_shape(*shape), dtype=torch.float32,
                                                     device=device)) if self.is_fp8 else weight)
        return tuple(out)  # type: ignore[return-value]

    # ---- restore ----
    def load_expert(self, layer: int, expert: int, *, device: torch.device | str = "cpu"
                    ) -> tuple[ExpertWeight, ExpertWeight, ExpertWeight]:
        """Fresh ``(w_gate [I, H], w_up [I, H], w_down [H, I])`` of one logical expert (``Fp8Weight``
        units for FP8 experts)."""
        dsts = self.empty_expert(device=device)
        self.load_expert_into(layer, expert, *dsts)
        return dsts

    def load_expert_into(self, layer: int, expert: int, w_gate_dst: ExpertWeight, w_up_dst: ExpertWeight,
                         w_down_dst: ExpertWeight, *, stream: torch.cuda.Stream | None = None) -> RestoreRecord:
        """Copy one expert into the given destinations (any device) from the first tier that serves it:
        tensors, or ``Fp8Weight`` units whose weights and scales are restored together.

        Raises ``ValueError`` for an unknown (layer, expert) or destinations of the wrong kind, shape or
        dtype (a caller bug: no tier is tried), ``ExpertUnavailableError`` when every tier failed.
        """
        dsts = (w_gate_dst, w_up_dst, w_down_dst)
        entries = self.manifest.expert_tensor_entries(layer, expert)  # ValueError naming the valid ranges
        for dst, entry in zip(destination_tensors(self.manifest, layer, expert, dsts), entries):
            if tuple(dst.shape) != entry.shape or dst.dtype != DTYPE_TO_TORCH[entry.dtype]:
                name = f"w_{entry.role}_dst" + (".scale" if entry.part == SCALE else "")
                raise ValueError(f"{name} is {list(dst.shape)} {dst.dtype}; layer {layer} expert {expert} is "
                                 f"{list(entry.shape)} {DTYPE_TO_TORCH[entry.dtype]}")
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


def load_layer_experts(shard_dir: str, layer: int, *, dequantize: bool = False
                       ) -> tuple[ExpertWeight, ExpertWeight, ExpertWeight]:
    """All experts of one MoE layer, stacked: ``(w_gate [E, I, H], w_up [E, I, H], w_down [E, H, I])``.

    The layout ``eep.reference.ExpertParallelMoE`` and ``dense_moe`` take; read from disk, verified.
    Block-scaled FP8 experts come as ``Fp8Weight`` stacks (FP8 weights and their float32 scales
    ``[E, ceil(out/128), ceil(in/128)]``); ``dequantize=True`` returns float32 tensors instead,
    exactly ``weight.float() * scale`` of each 128x128 block (unquantised experts: upcast).
    """
    store = ExpertStore(shard_dir, tiers=[DiskTier(shard_dir)])
    if layer not in store.moe_layers:
        raise ValueError(f"layer {layer} is not an MoE layer of {shard_dir}: MoE layers are {store.moe_layers}")
    stacks = store.empty_expert(lead=(store.num_experts,))
    for expert in range(store.num_experts):
        store.load_expert_into(layer, expert, *(w[expert] for w in stacks))
    store.close()
    if dequantize:
        return tuple(w.dequantize() if isinstance(w, Fp8Weight) else w.float() for w in stacks)  # type: ignore[return-value]
    return stacks
