"""A rank's expert slots: the ``SlotStore`` every engine's plan parts are executed on.

One allocation holds every slot of the rank, ``w13 [layers, slots, 2*inter, hidden]`` (gate rows,
then up rows) followed by ``w2 [layers, slots, hidden, inter]``; with block-scaled FP8 experts
(``dtype=torch.float8_e4m3fn``) both are ``eep.fp8.Fp8Weight`` stacks whose float32 128x128 scales
follow the e4m3 weights in the same allocation (``[layers, slots, 2*inter/128, hidden/128]`` and
``[layers, slots, hidden/128, inter/128]``), so a slot's gate, up and down views, a peer's mapping
and every copy carry weights and scales together. VMM device memory on a GPU
(``eep.fused.peer_memory.DeviceRegion``), an anonymous shared memory file on a CPU
(``eep.transport.shared_region.HostRegion``). The rank serves the allocation's fd from an
``FdServer`` and publishes its address, layout and incarnation under the store key
``weights/<rank>``, so a peer that a plan names as a copy source is mapped lazily by whoever copies
from it (cached per (rank, incarnation)) and read with no help from the peer: a GPU copies
device-to-device on its copy stream, off the compute stream; CI copies between real processes.

    part = PlanPart(epoch, placement, active, transfers, incarnations, is_source)
    report = engine.execute(part)          # SlotExecutor over RankSlots: stage, wait, switch
    job = engine.copy_in_background(part)  # re-replication while serving: job.step() per loop

What a slot's bytes hold is tracked in ``loaded [layers, slots]`` (``NO_EXPERT``: nothing known);
a transfer into a slot that already holds its expert is not copied again (a joiner's warm-up
filled it), and the switch refuses maps that name an expert a slot of this rank does not hold.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from eep.fp8 import BLOCK, FP8_DTYPE, ExpertWeight, Fp8Weight, block_scale_shape
from eep.repair import (ExecutionReport, ExpertSource, RepairError, SlotExecutor, Transfer, expert_weight_nbytes,
                        run_transfers)
from eep.repair.plan import HELD, stage_with_fallback
from eep.repair.slots import OneRankSlots
from eep.runtime.control.keys import Key, store_key
from eep.state import NO_EXPERT, ExpertPlacement, Membership


@dataclass
class PlanPart:
    """A rank's part of a committed plan (or of its warm-up's, or of a re-replication).

    ``placement`` and ``active`` are the maps and membership the part makes true (the switch at
    its end); ``transfers`` the copies into this rank's slots; ``incarnations`` the incarnation of
    each rank that may serve as a peer source; ``is_source(rank)`` whether a peer's slots are final
    for these maps (its own copies done), so reading them cannot see a half-written slot.
    """

    epoch: int
    placement: ExpertPlacement
    active: list[bool]
    transfers: list[Transfer]
    incarnations: dict[int, int] = field(default_factory=dict)
    is_source: Callable[[int], bool] | None = None


class RankSlots(OneRankSlots):
    """The ``eep.repair.SlotStore`` of one rank process (module docstring).

    Parameters:
        rank, num_ranks, num_layers, slots_per_rank, hidden, intermediate, dtype, device: the shape;
            ``dtype=torch.float8_e4m3fn``: block-scaled FP8 slots (``intermediate`` a multiple of 128,
            so gate's and up's scale blocks stay apart in ``w13``).
        store: the control store to publish ``weights/<rank>`` in and read peers' records from;
            None: no peer can copy from this rank nor this rank from a peer (a one-rank engine).
        run_id, incarnation: this process's run and incarnation (in the published record).
        on_switch: called with the new placement when maps switch (an engine's device table write).
        connect_timeout_s: bound on fetching one peer's fd (its server answers at once when alive).
    """

    def __init__(self, *, rank: int, num_ranks: int, num_layers: int, slots_per_rank: int, hidden: int,
                 intermediate: int, dtype: torch.dtype, device: torch.device, store: Any = None, run_id: str = "",
                 incarnation: int = 0, on_switch: Callable[[ExpertPlacement], None] | None = None,
                 connect_timeout_s: float = 1.0):
        L, S, I, H = num_layers, slots_per_rank, intermediate, hidden
        if dtype == FP8_DTYPE and I % BLOCK:
            raise ValueError(f"FP8 expert slots need intermediate % {BLOCK} == 0 (gate and up keep their own "
                             f"scale blocks in w13), got intermediate={I}")
        self.rank, self.num_ranks, self.slots_per_rank, self.num_layers = rank, num_ranks, S, L
        self.inter, self.device, self.dtype = I, device, dtype
        self.control_store, self.run_id, self.incarnation = store, run_id, incarnation
        self.on_switch, self.connect_timeout_s = on_switch, connect_timeout_s
        self.layout = {"layers": L, "slots": S, "inter": I, "hidden": H, "dtype": str(dtype)}
        self.region = _export(self.nbytes(L, S, I, H, dtype), device)
        self.w13, self.w2 = _slot_views(self.region.tensor, L, S, I, H, dtype)
        self.w13.fill_(float("nan"))  # an unloaded slot poisons any output that reads it
        self.w2.fill_(float("nan"))
        self.loaded = torch.full((L, S), NO_EXPERT, dtype=torch.int64)
        self.copy_stream = torch.cuda.Stream(device, priority=0) if device.type == "cuda" else None  # 0: lowest
        self.placement: ExpertPlacement | None = None
        self.active: list[bool] = [False] * num_ranks
        self.incarnations: dict[int, int] = {}
        self._peers: dict[int, tuple[int, Any, torch.Tensor, torch.Tensor]] = {}  # rank -> (incarnation, region, w13, w2)
        self.server = None
        if store is not None:
            from eep.transport.fd_passing import FdServer

            self.server = FdServer(self.region.fd, {"rank": rank, "incarnation": incarnation,
                                                    "nbytes": self.region.nbytes, "layout": self.layout})
            key = store_key(run_id, Key.WEIGHTS, rank)
            store.set(key, json.dumps({"address": self.server.public_address, "nbytes": self.region.nbytes,
                                       "layout": self.layout, "incarnation": incarnation, "pid": os.getpid()}))

    @staticmethod
    def nbytes(num_layers: int, slots_per_rank: int, intermediate: int, hidden: int, dtype: torch.dtype) -> int:
        """Bytes of every slot: weights, plus float32 block scales for FP8 (``eep.repair.expert_weight_nbytes``)."""
        return num_layers * slots_per_rank * expert_weight_nbytes(hidden, intermediate, fp8=dtype == FP8_DTYPE,
                                                                  dtype_bytes=dtype.itemsize)

    @property
    def is_fp8(self) -> bool:
        return self.dtype == FP8_DTYPE

    # ---- SlotStore (the bookkeeping: OneRankSlots) ----
    def views(self, layer: int, phys: int) -> tuple[ExpertWeight, ExpertWeight, ExpertWeight]:
        i = self._local(phys)
        return (*_gate_up(self.w13[layer, i], self.inter), self.w2[layer, i])

    def peer_views(self, layer: int, phys: int) -> tuple[ExpertWeight, ExpertWeight, ExpertWeight]:
        rank, i = divmod(phys, self.slots_per_rank)
        if rank == self.rank:
            return self.views(layer, phys)
        _, _, w13, w2 = self._peer(rank)
        return (*_gate_up(w13[layer, i], self.inter), w2[layer, i])

    def switch(self, placement: ExpertPlacement, membership: Membership) -> None:
        self.check_holds(placement)
        self.placement = placement
        self.active = membership.active_cpu.tolist()
        if self.on_switch is not None:
            self.on_switch(placement)

    # ---- plan parts ----
    def executor(self, part: PlanPart, tiers: Sequence[ExpertSource]) -> SlotExecutor:
        self.incarnations = dict(part.incarnations)
        membership = Membership(self.num_ranks, active=part.active, epoch=part.epoch)
        return SlotExecutor(self, membership, tiers, is_source=part.is_source)

    def execute(self, part: PlanPart, tiers: Sequence[ExpertSource]) -> ExecutionReport:
        """Copy ``part.transfers`` (peer, then the tiers on fallback), wait for them, switch the maps."""
        return run_transfers(self.executor(part, tiers), part.transfers, part.placement, part.epoch)

    def copy_in_background(self, part: PlanPart, tiers: Sequence[ExpertSource]) -> "BackgroundCopies":
        return BackgroundCopies(self.executor(part, tiers), part.transfers)

    # ---- peers ----
    def _peer(self, rank: int) -> tuple[int, Any, torch.Tensor, torch.Tensor]:
        """``rank``'s slots mapped here, for the incarnation the plan names (``RepairError`` otherwise)."""
        want = self.incarnations.get(rank)
        cached = self._peers.get(rank)
        if cached is not None and cached[0] == want:
            return cached
        if self.control_store is None:
            raise RepairError(f"rank {self.rank}: no control store to find rank {rank}'s slots in")
        key = store_key(self.run_id, Key.WEIGHTS, rank)
        if not self.control_store.check([key]):
            raise RepairError(f"rank {rank} published no slots under {key!r}")
        record = json.loads(self.control_store.get(key))
        if want is None or record["incarnation"] != want:
            raise RepairError(f"rank {rank}'s published slots are incarnation {record['incarnation']}, the member "
                              f"the plan copies from is incarnation {want}")
        if record["layout"] != self.layout:
            raise RepairError(f"rank {rank}'s slots have layout {record['layout']}, this rank {self.layout}")
        from eep.transport.fd_passing import fetch_fd

        try:
            fd, header = fetch_fd(record["address"], timeout_s=self.connect_timeout_s)
        except OSError as exc:
            raise RepairError(f"rank {rank} (pid {record.get('pid')}) did not hand over its slots: {exc}") from exc
        if header.get("incarnation") != want:
            os.close(fd)
            raise RepairError(f"rank {rank}'s fd server is incarnation {header.get('incarnation')}, not {want}")
        region = _import(fd, int(header["nbytes"]), self.device)
        w13, w2 = _slot_views(region.tensor, self.num_layers, self.slots_per_rank, self.inter,
                              self.layout["hidden"], self.dtype)
        if cached is not None:  # the dead incarnation's mapping: no copy in flight reads it any more
            if self.copy_stream is not None:
                self.copy_stream.synchronize()
            cached[1].close()
        self._peers[rank] = (want, region, w13, w2)
        return self._peers[rank]

    def close(self) -> None:
        if self.copy_stream is not None:
            self.copy_stream.synchronize()
        if self.server is not None:
            self.server.close()
        for _, region, _, _ in self._peers.values():
            region.close()
        self._peers.clear()
        self.w13 = self.w2 = None
        self.region.close()


class BackgroundCopies:
    """A plan part copied while the rank keeps serving (re-replication): ``step()`` enqueues one
    layer's batch per call (on the copy stream on a GPU, so it overlaps the compute stream's steps;
    synchronously on a CPU, between steps) and says when every copy is done; ``void()`` drops them
    (the slots written are poisoned: a failure or join came first). Nothing switches: the copies
    land in slots no route reads, and a later commit's plan finds them held."""

    def __init__(self, executor: SlotExecutor, transfers: Sequence[Transfer]):
        self.executor = executor
        self.transfers = list(transfers)
        self.layers = sorted({t.layer for t in self.transfers})
        self.report = ExecutionReport()
        self.started = time.perf_counter()
        self.is_done = False

    def step(self) -> bool:
        """Enqueue the next batch; True once every batch is enqueued and has finished. Raises
        ``RepairError`` when a copy could not be made from any source (nothing is switched)."""
        if self.layers:
            layer = self.layers.pop(0)
            for t in (t for t in self.transfers if t.layer == layer):
                if self.executor.holds(t):
                    self.report.observed_s.append(0.0)
                    self.report.served_by.append(HELD)
                    continue
                seconds, served_by = stage_with_fallback(self.executor, t, self.report.fallbacks)
                self.report.observed_s.append(seconds)
                self.report.served_by.append(served_by)
            return False
        if not self.is_done and self.executor.is_done():
            self.is_done = True
            self.report.total_s = time.perf_counter() - self.started
            self.report.batches = self.executor.batch_times()
        return self.is_done

    def void(self) -> None:
        self.executor.discard()


def restore_stats(report: ExecutionReport, transfers: Sequence[Transfer]) -> dict:
    """What a rank's timeline records of a part it executed: copies by tier, batches, total seconds."""
    return {"by_tier": report.by_tier(transfers), "seconds": report.total_s, "experts": report.num_copied,
            "held": len(transfers) - report.num_copied, "batches": report.batches, "fallbacks": report.fallbacks[:4]}


def _slot_views(region: torch.Tensor, L: int, S: int, I: int, H: int, dtype: torch.dtype
                ) -> tuple[ExpertWeight, ExpertWeight]:
    """``(w13, w2)`` over the allocation: weights first, then (FP8) their block scales."""
    shapes = ((L, S, 2 * I, H), (L, S, H, I))
    views, offset = [], 0
    for shape in shapes:
        n = shape[0] * shape[1] * shape[2] * shape[3] * dtype.itemsize
        views.append(region[offset:offset + n].view(dtype).view(shape))
        offset += n
    if dtype != FP8_DTYPE:
        return views[0], views[1]
    scales = []
    for shape in shapes:
        scale_shape = (L, S, *block_scale_shape(shape[2], shape[3]))
        n = scale_shape[0] * scale_shape[1] * scale_shape[2] * scale_shape[3] * 4
        scales.append(region[offset:offset + n].view(torch.float32).view(scale_shape))
        offset += n
    return Fp8Weight(views[0], scales[0]), Fp8Weight(views[1], scales[1])


def _gate_up(w13: ExpertWeight, inter: int) -> tuple[ExpertWeight, ExpertWeight]:
    """One slot's ``w13 [2*inter, hidden]`` as its gate and up halves (views; FP8 scales split by block)."""
    if isinstance(w13, Fp8Weight):
        blocks = inter // BLOCK
        return (Fp8Weight(w13.weight[:inter], w13.scale[:blocks]), Fp8Weight(w13.weight[inter:], w13.scale[blocks:]))
    return w13[:inter], w13[inter:]


def _export(nbytes: int, device: torch.device):
    if device.type == "cuda":
        from eep.fused.peer_memory import DeviceRegion
        return DeviceRegion.exported(nbytes, device)
    from eep.transport.shared_region import HostRegion
    return HostRegion.exported(nbytes)


def _import(fd: int, nbytes: int, device: torch.device):
    if device.type == "cuda":
        from eep.fused.peer_memory import DeviceRegion
        return DeviceRegion.imported(fd, nbytes, device)
    from eep.transport.shared_region import HostRegion
    return HostRegion.imported(fd, nbytes)
