"""The data-plane seam of a rank: what ``RankWorker`` asks of the engine that runs decode steps.

The control plane (launcher, coordinator, decisions, requests, fencing) is the same for every
engine; only the data plane differs. ``RuntimeConfig.engine`` picks one:

- ``"shm"`` (``ShmEngine``): the CPU data plane over the shared-memory transport (docs/runtime.md);
- ``"fused"`` / ``"fused_fixed"`` / ``"nccl"`` (``eep.runtime.engines.gpu.GpuEngine``): the
  bench model in bf16 with CUDA-graph decode steps over the fused GPU buffer (membership-aware or
  the fixed-membership baseline) or NCCL all-to-all; ``"gloo"`` (the NCCL engine's code over gloo
  on CPU), ``"cpu_elastic"`` (the same engine over the shared-memory transport, membership-aware)
  and ``"local"`` (one rank, no communication) exist for CPU tests. Imported lazily: this module imports no CUDA package.

An engine is created once per rank process and keeps its expert slots (``engine.slots``, a
``RankSlots``: eep/runtime/engines/slots.py) across epochs:

    engine.execute(part) -> ExecutionReport     # this rank's part of a plan: copy, wait, switch the maps
    engine.copy_in_background(part)             # re-replication copies while serving (no switch)
    engine.warmup()                             # run local experts alone, before joining
    engine.on_commit(active=, joined=, epoch=, start_step=, is_joiner=)   # membership switch
    engine.decode(tokens, active=, placement=, epoch=, step=, timeout_s=, should_abort=) -> list[int]
    engine.close()

``decode`` raises ``StepAborted`` when a peer missed a deadline or a new decision interrupted it;
the step is then discarded (tokens are only appended when a whole step completes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from eep.repair import ExecutionReport
from eep.runtime.config import RuntimeConfig
from eep.runtime.engines.slots import BackgroundCopies, PlanPart, RankSlots
from eep.state import ExpertPlacement

ENGINES = ("shm", "fused", "fused_fixed", "nccl", "gloo", "cpu_elastic", "local")


class StepAborted(Exception):
    """A receive of this step did not complete: peers missed the deadline, or a new decision came."""

    def __init__(self, layer: int, phase: str, missed: list[int], *, is_aborted: bool):
        self.layer, self.phase, self.missed, self.is_aborted = layer, phase, missed, is_aborted
        why = "a new membership decision arrived" if is_aborted else f"ranks {missed} missed the deadline"
        super().__init__(f"layer {layer} {phase}: {why}")


class Engine(Protocol):
    slots: RankSlots

    def execute(self, part: PlanPart) -> ExecutionReport: ...

    def copy_in_background(self, part: PlanPart) -> BackgroundCopies: ...

    def warmup(self) -> None: ...

    def on_commit(self, *, active: list[bool], joined: list[int], epoch: int, start_step: int,
                  is_joiner: bool) -> None: ...

    def decode(self, tokens: torch.Tensor, *, active: list[bool], placement: ExpertPlacement, epoch: int, step: int,
               timeout_s: float, should_abort: Callable[[], bool] | None = None) -> list[int]: ...

    def close(self) -> None: ...


def make_engine(cfg: RuntimeConfig, rank: int, *, shm_path: str, store: Any, run_id: str,
                incarnation: int) -> Engine:
    """The engine ``cfg.engine`` names, for ``rank`` (errors name the unknown engine)."""
    if cfg.engine == "shm":
        from eep.runtime.engines.shm import ShmEngine
        return ShmEngine(cfg, rank, shm_path=shm_path, store=store, run_id=run_id, incarnation=incarnation)
    if cfg.engine in ENGINES:
        from eep.runtime.engines.gpu import GpuEngine  # lazily: its exchanges import CUDA packages
        return GpuEngine(cfg, rank, store=store, run_id=run_id, incarnation=incarnation, engine=cfg.engine,
                         shm_path=shm_path)
    raise ValueError(f"RuntimeConfig.engine={cfg.engine!r} is not one of {ENGINES}")


def transport_capacity_nbytes(cfg: RuntimeConfig) -> int:
    """Bytes of one region of the launcher's shared-memory file for ``cfg.engine``."""
    from eep.exchange.shm import ShmExchange

    if cfg.engine in ("shm", "cpu_elastic"):  # float32 tiny model / bf16 bench model
        return ShmExchange.capacity_nbytes(cfg.slots_per_rank, cfg.token_capacity, cfg.model.hidden,
                                           elem_nbytes=4 if cfg.engine == "shm" else 2)
    return 64  # GPU engines move data through their own buffers; the file only keeps the layout
